"""Phase 1: pretrain the base autoregressive policy on the expert data D.

Loss per valid step t of an episode: -sum_a q_t(a) log p(a | o_1..o_t) + lambda * -log p(o_{t+1} |
o_1..o_t), the observation term summed over the observation's features (the last step of an
episode has no next observation in the data and only contributes its action term). The action
target q_t is the action taken in the data (one-hot: the paper's NLL) or, with `labels="expert"`,
the noise-free expert's distribution at o_t. Both terms go through the model's heads
(`hrl.models.heads`), so the same code trains either backbone on either space: the grid's
categorical actions and Bernoulli bits, or the ant's Gaussian actions (target: the action taken)
and Gaussian next observation. The logged fit of the most likely action to the target is
`action_accuracy` for discrete actions and `action_mse` (the Gaussian mean's squared error to the
data's action, averaged over its components) for continuous ones. AdamW. Everything of one update
is one jitted function; `train_chunk` runs `updates_per_chunk` of them in `lax.scan`, drawing
each batch with the key carried in the state (so a resumed run repeats the same batches).

Where batches come from (`PretrainConfig.data`, DECIDE, the spec allows both):
- "dataset": episodes sampled from the collected dataset D (the paper's setting), one per row,
  padded to the longest;
- "online": fresh expert episodes from D's distribution generated inside the update, so no
  episode is seen twice, packed back to back into rows of `horizon` steps (segment ids keep
  each step's attention inside its own episode, so nothing is padding). A small model on a
  CPU budget memorises a finite D (train accuracy 0.88 vs 0.64 held out with 8192 episodes in
  one run) and then fails closed-loop; an endless stream removes that failure at the cost of
  one batched expert rollout per update. Packing puts about 2.3 episodes in the compute of
  one padded episode (D's epsilon = 0.2 episodes average 42.6 of 100 steps).

Which action is the target (`PretrainConfig.labels`, DECIDE):
- "taken": the action in the data (the paper's NLL);
- "expert" (online data only): the noise-free expert's distribution over its optimal moves, on
  the states that D's noisy expert (`collect.epsilon`) visits. The model sees off-path states
  and learns to recover from them without imitating the noise (DART, Laskey et al. 2017), and
  the soft target removes the sampling noise of the expert's tie-breaking from the gradient.
- "posterior" (online, grid only): the expectation of the "expert" label given what the model
  sees, the episode so far: each pretraining task's clean distribution averaged over the task's
  posterior given the layout and the moves before t (`posterior_targets`). A task-blind model
  can predict no more than that expectation, so the loss has the same minimiser as with
  "expert" labels, without the noise of which task the episode happened to draw (the next
  subgoal, wherever it is open). Costs one shortest-path search per colour and step instead of
  one per step (quick preset: 15 s per 100 updates against 9.5). The prior leaves out that a
  task's layouts are redrawn at different rates (`hrl.analysis.headroom`).

Evaluation is closed-loop in the environment with the cached incremental decoder: success when
any pretraining task counts (the model cannot see the task, so this is the right measure) and on
the post-training task (expected near zero), sampling the actions and again greedily. The
any-task episodes have the layouts of the data (a drawn task is doable: `envs.grid_pinpad`).

Why the quick preset departs from the paper where it does (online data, expert labels, the recency
prior, `boundary_weight`, `own_episodes`), with the runs that decided each, is in
docs/gridworld_findings.md ("Pretraining").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from envs.experts import per_task
from hrl.data import expert as expert_data
from hrl.infra.config import check
from hrl.infra.mesh import Mesh, shard_batch
from hrl.infra.objectives import masked_mean
from hrl.infra.train_state import TrainState, adamw
from hrl.models import heads, rollout
from hrl.models.backbones import ModelConfig, make_model
from hrl.models.hawk import HawkConfig
from hrl.models.transformer import ResidualStreamModel, TransformerConfig


DATA_SOURCES = ("dataset", "online")
LABELS = ("taken", "expert", "posterior")


class Batch(NamedTuple):
    obs: jax.Array  # [B, T, obs_dim]
    targets: jax.Array  # [B, T, ...] action targets (`heads`): one-hot or the expert's distribution, or actions
    mask: jax.Array  # [B, T] the steps that happened
    segments: jax.Array | None = None  # [B, T] episode of each step where episodes are packed
    weights: jax.Array | None = None  # [B, T] each step's weight in the training loss (None: all 1)


@dataclasses.dataclass
class PretrainConfig:
    """Paper (grid): AdamW lr 3e-4, weight decay 0.03, 256k steps at batch 1024, lambda in {0, 0.01}."""

    learning_rate: float = 3e-4
    final_lr_fraction: float = 1.0  # cosine decay to learning_rate x this over num_updates (1: constant, the paper's)
    weight_decay: float = 0.03
    decay_kernels_only: bool = False  # True: no decay of biases, norms and position biases (not in the paper)
    max_grad_norm: float = 1.0
    obs_loss_weight: float = 0.01  # lambda
    batch_size: int = 64  # sequences per update: episodes of D, or (online) packed streams of horizon steps
    num_updates: int = 3000
    updates_per_chunk: int = 50
    eval_episodes: int = 256
    data: str = "dataset"  # "dataset" (batches from D) or "online" (fresh expert episodes per update)
    labels: str = "taken"  # "taken" (the data's actions), "expert" (the noise-free expert's distribution) or
    # "posterior" (that distribution averaged over the tasks the history leaves possible; grid only)
    # DECIDE (not in the paper; online data, gridworld): the weight in the loss of the steps
    # between a finished subgoal and the next one's first colour, where a task-blind model must
    # choose among the subgoals its history leaves possible, and where most closed-loop failures
    # happen (`hrl headroom`). The weight depends only on the colours visited so far, which the
    # model sees, so each step's best prediction is unchanged: only how hard training pushes
    # towards it. 1: every step alike.
    boundary_weight: float = 1.0
    # DECIDE (not in the paper; online data, gridworld): rows added to every batch that are the
    # model's own closed-loop episodes ("any pretraining task", one per row), each step labelled
    # with the "posterior" target (DAgger, Ross et al. 2011, with the Bayes task-blind expert as
    # the labeller): the states the model gets lost in, with the way back. 0: none.
    own_episodes: int = 0

    def validate(self) -> None:
        for name in ("learning_rate", "max_grad_norm", "batch_size", "num_updates", "updates_per_chunk", "eval_episodes"):
            check(getattr(self, name) > 0, name, "must be > 0", getattr(self, name))
        check(0 < self.final_lr_fraction <= 1, "final_lr_fraction", "must be in (0, 1]", self.final_lr_fraction)
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        check(self.data in DATA_SOURCES, "data", f"must be one of {DATA_SOURCES}", self.data)
        check(self.labels in LABELS, "labels", f"must be one of {LABELS}", self.labels)
        check(self.labels == "taken" or self.data == "online", "labels",
              f"'{self.labels}' needs data=online (a dataset stores the taken actions only)", self.labels)
        check(self.obs_loss_weight >= 0, "obs_loss_weight", "must be >= 0", self.obs_loss_weight)
        check(self.boundary_weight > 0, "boundary_weight", "must be > 0", self.boundary_weight)
        check(self.boundary_weight == 1 or (self.data == "online" and self.labels != "posterior"), "boundary_weight",
              "needs data=online with labels taken or expert (the expert's states give the progress)", self.boundary_weight)
        check(self.own_episodes >= 0, "own_episodes", "must be >= 0", self.own_episodes)
        check(self.own_episodes == 0 or self.data == "online", "own_episodes", "needs data=online", self.own_episodes)
        check(self.num_updates % self.updates_per_chunk == 0, "num_updates",
              f"must be a multiple of updates_per_chunk ({self.updates_per_chunk})", self.num_updates)

    @property
    def num_chunks(self) -> int:
        return self.num_updates // self.updates_per_chunk


def make_optimizer(cfg: PretrainConfig) -> optax.GradientTransformation:
    learning_rate = optax.cosine_decay_schedule(cfg.learning_rate, cfg.num_updates, cfg.final_lr_fraction)
    return adamw(learning_rate, cfg.weight_decay, cfg.max_grad_norm, decay_kernels_only=cfg.decay_kernels_only)


def init(
    key: jax.Array,
    cfg: PretrainConfig,
    model_cfg: ModelConfig | TransformerConfig | HawkConfig,
    observation: heads.ObservationSpec,
    action: heads.ActionSpec,
    grid_shape: tuple[int, int, int] | None = None,
) -> TrainState:
    """A fresh base model (the backbone `model_cfg` names, heads for the `observation` and
    `action` spaces: see `hrl.models.backbones.make_model`) and its optimiser."""
    model_key, train_key = jax.random.split(key)
    model = make_model(model_cfg, observation, action, grid_shape=grid_shape, rngs=nnx.Rngs(params=model_key))
    return TrainState.create(model, make_optimizer(cfg), train_key)



def losses(
    model: ResidualStreamModel,
    obs: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    segments: jax.Array | None = None,
    weights: jax.Array | None = None,
    observation_loss: bool = True,
) -> dict[str, jax.Array]:
    """Per-step losses of a batch (see `Batch`), and the fit of the model's most likely action to
    the target (`action_accuracy`: it is one the target allows, with one-hot targets the taken
    action; or `action_mse`: see `heads`). With `weights`, also `weighted_action_nll`, the
    action NLL's mean with those weights. Without `observation_loss` the observation head is not
    evaluated at all (lambda = 0 costs nothing)."""
    out = model(obs, segments=segments)
    action_dist = model.action_dist
    action_nll = action_dist.target_nll(out.action_params, targets)
    fit = action_dist.target_fit(out.action_params, targets)
    terms = {"action_nll": masked_mean(action_nll, mask), action_dist.fit_metric: masked_mean(fit, mask)}
    if weights is not None:
        terms["weighted_action_nll"] = masked_mean(action_nll, mask * weights)
    if observation_loss:
        obs_nll = model.obs_dist.nll(out.obs_params[:, :-1], obs[:, 1:])
        has_next = mask[:, 1:] if segments is None else mask[:, 1:] & (segments[:, 1:] == segments[:, :-1])
        terms["obs_nll"] = masked_mean(obs_nll, has_next)
    return terms


def dataset_batches(dataset: Any, batch_size: int, action: heads.ActionSpec) -> Callable[[jax.Array], Batch]:
    """`sample(key)`: `batch_size` episodes of `dataset` drawn uniformly with replacement, their
    actions made targets for the head of the `action` space (an int: that many discrete actions)."""
    action_dist = heads.for_actions(action)
    # Steps after the longest episode are padding in every episode: dropping them changes no loss
    # (attention is causal, padded steps are masked) and saves compute, attention's above all.
    longest = int(np.max(dataset.lengths))
    obs, actions, mask = (jnp.asarray(np.asarray(x)[:, :longest]) for x in (dataset.obs, dataset.actions, dataset.mask))

    def sample(key: jax.Array) -> Batch:
        episodes = jax.random.randint(key, (batch_size,), 0, obs.shape[0])
        return Batch(obs[episodes], action_dist.targets(actions[episodes]), mask[episodes])

    return sample


def online_batches(env: Any, env_params: Any, expert: Callable, batch_size: int,
                   to_targets: Callable[[expert_data.Stream], jax.Array] | None = None,
                   step_weight: Callable[[Any], jax.Array] | None = None) -> Callable[[jax.Array], Batch]:
    """`sample(key)`: `batch_size` sequences of `env.max_steps` steps, each fresh expert episodes
    back to back (packed: no padding; a step sees only its own episode), generated inside the
    jitted update. `expert(key, state, params) -> (action, label)`: see `taken_action_targets` and
    `envs.experts.make_labelled_expert`; the labels are the targets unless `to_targets(stream)`
    makes them (`posterior_targets`). `step_weight(state)`, if given, weighs each step in the
    loss (`boundary_weight`)."""
    if step_weight is not None:
        expert = with_step_weights(expert, step_weight)

    def sample(key: jax.Array) -> Batch:
        streams = expert_data.rollout_streams(env, env_params, expert, key, batch_size, env.max_steps)
        labels, weights = streams.labels if step_weight is not None else (streams.labels, None)
        targets = labels if to_targets is None else to_targets(streams._replace(labels=labels))
        return Batch(streams.obs, targets, jnp.ones(streams.segments.shape, bool), streams.segments, weights)

    return sample


def own_episode_batches(env: Any, num_episodes: int, epsilon: float, layouts_doable: bool,
                        step_weight: Callable[[Any], jax.Array] | None = None
                        ) -> Callable[[jax.Array, ResidualStreamModel], Batch]:
    """`sample(key, model)`: `num_episodes` closed-loop "any pretraining task" episodes of `model`
    (grid), one per row, each step's target the "posterior" label: the clean expert's
    distribution averaged over the tasks' posterior given the episode so far, with the model's
    own moves as the evidence of D's `epsilon`-noisy expert (`posterior_targets`). Any move that
    does not end the episode has some probability under that expert, so the posterior is defined
    wherever the model wanders. `step_weight(state)` weighs the steps as in `online_batches`."""
    params = env.pretrain_params(any_task=True)
    weigh = step_weight or (lambda state: jnp.float32(1.0))

    def record(state, action, next_state):
        return state, action

    def observed_and_labelled(state):  # after the rollout, all steps at once: not in its sequential scan
        return env.observe(state, params), per_task(state, params, epsilon, env.horizon), weigh(state)

    def sample(key: jax.Array, model: ResidualStreamModel) -> Batch:
        keys = jax.random.split(key, num_episodes)
        episodes = jax.vmap(lambda k: rollout.run_episode(model, env, params, k, watch=record))(keys)
        states, actions = episodes.watched
        obs, views, weights = jax.vmap(jax.vmap(observed_and_labelled))(states)
        segments = jnp.zeros(actions.shape, jnp.int32)
        targets = posterior_targets(expert_data.Stream(obs, actions, views, segments), layouts_doable)
        mask = jnp.arange(env.max_steps) < episodes.length[:, None]
        # After an episode's end no task is left possible and the posterior is NaN: zero it, so
        # that the masked mean's 0 x target stays 0.
        return Batch(obs, jnp.where(mask[..., None], targets, 0.0), mask, segments, weights)

    return sample


def with_step_weights(expert: Callable, step_weight: Callable[[Any], jax.Array]) -> Callable:
    """`expert` with its label paired with its step's loss weight, `step_weight(state)`."""

    def weighted(key, state, params):
        action, label = expert(key, state, params)
        return action, (label, step_weight(state))

    return weighted


def boundary_weight(weight: float) -> Callable[[Any], jax.Array]:
    """A grid state's loss weight: `weight` between a finished subgoal and the next one's first
    colour (subgoals are colour pairs: an even, nonzero number of colours visited), else 1."""
    return lambda state: jnp.where((state.progress > 0) & (state.progress % 2 == 0), weight, 1.0)


def posterior_targets(streams: expert_data.Stream, layouts_doable: bool) -> jax.Array:
    """[B, T, 4] E[clean expert distribution | the episode so far]: each task's clean distribution
    (`envs.experts.TaskView`, the streams' labels) averaged over the task's posterior given the
    layout and the moves before t. The prior is uniform over the tasks doable at the episode's
    first step when `layouts_doable` (the env redraws the others: `solvable_only`), else over all."""

    def step(carry, now):
        log_posterior, episode = carry
        view, action, segment = now
        log_posterior = jnp.where(segment != episode, task_prior(view, layouts_doable), log_posterior)
        possible, target = task_mixture(log_posterior, view.consistent, view.clean)
        return (task_evidence(possible, view, action), segment), target

    def one_stream(views, actions, segments):
        init = (jnp.zeros(views.consistent.shape[-1]), jnp.int32(-1))
        return jax.lax.scan(step, init, (views, actions, segments))[1]

    return jax.vmap(one_stream)(streams.labels, streams.actions, streams.segments)


def task_prior(view: Any, layouts_doable: bool) -> jax.Array:
    """[K] log prior over the tasks at an episode's first step: uniform over the doable ones when
    the env redraws the others (`solvable_only`), else over all."""
    return jnp.where(view.doable | (not layouts_doable), 0.0, -jnp.inf)


def task_mixture(log_posterior: jax.Array, consistent: jax.Array, clean: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(the log posterior restricted to the tasks the visited colours leave possible, the clean
    expert distributions [K, 4] averaged over it)."""
    possible = jnp.where(consistent, log_posterior, -jnp.inf)
    # The drawn task is always consistent; if the prior ruled it out (the redraws gave up), fall
    # back to a uniform prior rather than a posterior over no task.
    possible = jnp.where(jnp.any(possible > -jnp.inf), possible, jnp.where(consistent, 0.0, -jnp.inf))
    return possible, jax.nn.softmax(possible) @ clean


def task_evidence(log_posterior: jax.Array, view: Any, action: jax.Array) -> jax.Array:
    """The log posterior after the move `action`: each task's noisy expert's probability of it."""
    return log_posterior + jnp.log(jnp.maximum(view.moves[:, action], 1e-30))


def taken_action_targets(expert_policy: Callable, action_space: heads.ActionSpec) -> Callable:
    """An expert whose target is the action it takes (one-hot for discrete actions): the paper's NLL."""
    action_dist = heads.for_actions(action_space)

    def expert(key, state, params):
        action = expert_policy(key, state, params)
        return action, action_dist.targets(action)

    return expert


def objective(params: nnx.State, graphdef: nnx.GraphDef, batch: Batch, cfg: PretrainConfig) -> tuple[jax.Array, dict]:
    """The training loss (action NLL + lambda x observation NLL) and its terms."""
    terms = losses(nnx.merge(graphdef, params), *batch, observation_loss=cfg.obs_loss_weight > 0)
    return terms.get("weighted_action_nll", terms["action_nll"]) + cfg.obs_loss_weight * terms.get("obs_nll", 0.0), terms


def make_train_chunk(cfg: PretrainConfig, sample_batch: Callable[[jax.Array], Batch], mesh: Mesh | None = None,
                     own_batch: Callable[[jax.Array, ResidualStreamModel], Batch] | None = None,
                     ) -> Callable[[TrainState], tuple[TrainState, dict]]:
    """A jitted `train_chunk(state) -> (state, metrics)` of `cfg.updates_per_chunk` updates, each on
    `sample_batch(key)` (see `dataset_batches` and `online_batches`), with the rows of
    `own_batch(key, model)` (`own_episode_batches`) appended if given. With a `mesh`, each batch
    is split over its devices."""
    optimizer = make_optimizer(cfg)

    def draw(key: jax.Array, state: TrainState) -> Batch:
        if own_batch is None:
            return sample_batch(key)
        key, own_key = jax.random.split(key)
        return concatenate_rows(sample_batch(key), own_batch(own_key, state.module()))

    def update(state: TrainState, _):
        key, batch_key = jax.random.split(state.key)
        batch = shard_batch(draw(batch_key, state), mesh)
        (loss, terms), grads = jax.value_and_grad(objective, has_aux=True)(state.params, state.graphdef, batch, cfg)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(params=params, opt_state=opt_state, key=key), {"loss": loss, **terms}

    @jax.jit
    def train_chunk(state: TrainState):
        state, metrics = jax.lax.scan(update, state, length=cfg.updates_per_chunk)
        return state, jax.tree.map(jnp.mean, metrics)

    return train_chunk


def concatenate_rows(first: Batch, second: Batch) -> Batch:
    """One batch of both batches' rows (a missing `weights` or `segments` is all 1 or all 0)."""
    def filled(batch: Batch) -> Batch:
        ones = jnp.ones(batch.mask.shape, jnp.float32)
        return batch._replace(weights=ones if batch.weights is None else batch.weights,
                              segments=jnp.zeros_like(batch.mask, jnp.int32) if batch.segments is None else batch.segments)

    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), filled(first), filled(second))


def make_evaluate(cfg: PretrainConfig, env: Any, key: jax.Array) -> Callable[[TrainState], dict]:
    """A jitted closed-loop evaluation: any pretraining task, and the post-training task, each
    with sampled actions (`any_pretrain/success_rate`: the policy as RL and the controllers use
    it) and with the most likely action (`any_pretrain/greedy_success_rate`). The episode keys
    are fixed, so every evaluation of a run sees the same layouts."""
    tasks = {"any_pretrain": env.pretrain_params(any_task=True), "posttrain": env.posttrain_params()}
    keys = jax.random.split(key, cfg.eval_episodes)

    @jax.jit
    def evaluate(state: TrainState):
        model = state.module()
        metrics = {}
        for task, params in tasks.items():
            for prefix, greedy in rollout.DECODINGS:
                results = rollout.evaluate(model, env, params, keys, greedy)
                metrics.update({f"{task}/{prefix}{name}": value for name, value in results.items()})
        return metrics

    return evaluate
