"""Supervised controllers: can the frozen base model be steered to a subgoal through its residual stream?

For a controlled layer l, one linear controller U_g per ground-truth subgoal g acts as
e_l <- e_l + U_g e_l, and blocks l+1..L run on the result. The controllers are trained on the clean
expert data D* by action NLL, each step steered by the controller of that step's ground-truth
subgoal, with the base model frozen (closed over as a constant: its parameters are not in the train
state). U = A B^T of rank r (paper, grid: r = 16) or a full matrix (paper, ant); B starts at zero,
so U starts at exactly zero and training starts from the base model.

Then they are chained on the post-training task, closed-loop: at every step the controller of the
subgoal the environment currently reports acts, so the controller switches as soon as the
environment reports a subgoal done. Paper (Fig. 4): high post-training success, best mid-depth,
while the unsteered base model (evaluated on the same episodes as the reference) rarely succeeds.
The stage also chains them on every two-subgoal task X-Y (`make_evaluate_transitions`): the pairs
whose transition X -> Y some pretraining task has against those none has, the kind the
post-training task is made of, at the same short length.

One controller set per controlled layer; all sets of the sweep train side by side in one update
(the base's lower blocks run once for all of them), each with its own optimiser state.

`own_episodes` (not the paper's method) adds the steered model's own episodes, labelled by D*'s
expert (`own_steered_episodes`). `counterfactual_weight` (not the paper's method either) adds,
at D*'s steps between two subgoals, the clean expert's move towards every other subgoal's first
colour as a target of that subgoal's controller (`counterfactual_nll`). D* never shows a
subgoal starting where the pretraining tasks rule it out (B right after A); these targets do, on
D*'s own states, without any episode of the post-training task.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from envs import pinpad
from envs.base import Env
from hrl.data import expert as expert_data
from hrl.infra.config import check
from hrl.infra.mesh import Mesh, shard_batch
from hrl.infra.objectives import masked_mean
from hrl.infra.train_state import TrainState, adamw, independent_along_leading_axis
from hrl.models import rollout
from hrl.models.transformer import Transformer


@dataclasses.dataclass
class ControllerConfig:
    """Paper: rank-16 U in the grid (a full U for the ant); Fig. 4 sweeps the controlled layer, and
    the later phases control layer L/2. The paper gives no training settings for these
    controllers: ours are the metacontroller's optimiser (AdamW lr 1e-3, weight decay 0.03)."""

    rank: int | None = 16  # U = A B^T of this rank; 0 or None: a full width x width U
    layers: tuple[int, ...] = ()  # the controlled layers of the sweep; empty: every layer 0..L
    learning_rate: float = 1e-3
    final_lr_fraction: float = 1.0  # cosine decay to learning_rate x this over num_updates (1: constant)
    weight_decay: float = 0.03
    max_grad_norm: float = 1.0
    batch_size: int = 64  # episodes of D* per update
    num_updates: int = 2000
    updates_per_chunk: int = 100
    eval_episodes: int = 256  # post-training episodes per controlled layer, on fixed layouts
    # "dataset": episodes of the collected D* (the paper); "online": fresh clean-expert episodes
    # inside every update, never the same twice (DECIDE: the paper gives no size for D*). On the
    # quick preset's 1024-episode D*, full-rank controllers at layer 2 reached action NLL 0.15 on
    # D* but 0.50 on fresh episodes, worse than the unsteered base model (0.34): memorised.
    data: str = "dataset"
    # DECIDE (not in the paper; online data, gridworld): the weight of a counterfactual term. At
    # every step of D* between two subgoals, each subgoal g's controller is also trained towards
    # the clean expert's move to g's first colour from that state, as if the task went on with g
    # (`envs.experts.subgoal_start_labels`): contexts D* has, with targets of transitions it may
    # never have (A -> B after A). Same states and expert as D*, no post-training episode. 0: the
    # paper's controllers.
    counterfactual_weight: float = 0.0
    # DECIDE (not in the paper; gridworld): per controller set, rows of the steered base model's own
    # closed-loop episodes on D*'s tasks in every update, each step labelled with the clean expert's
    # move from the state reached (DAgger, Ross et al. 2011, as `pretrain.own_episodes` for the
    # base): the states the steered model strays into, with the way back. 0: none (the paper).
    own_episodes: int = 0

    def validate(self) -> None:
        for name in ("learning_rate", "max_grad_norm", "batch_size", "num_updates", "updates_per_chunk", "eval_episodes"):
            check(getattr(self, name) > 0, name, "must be > 0", getattr(self, name))
        check(0 < self.final_lr_fraction <= 1, "final_lr_fraction", "must be in (0, 1]", self.final_lr_fraction)
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        check(self.rank is None or self.rank >= 0, "rank", "must be >= 0 (0: full matrix)", self.rank)
        check(len(set(self.layers)) == len(self.layers) and all(layer >= 0 for layer in self.layers), "layers",
              "must be distinct layer indices >= 0", self.layers)
        check(self.num_updates % self.updates_per_chunk == 0, "num_updates",
              f"must be a multiple of updates_per_chunk ({self.updates_per_chunk})", self.num_updates)
        check(self.data in ("online", "dataset"), "data", "must be 'online' or 'dataset'", self.data)
        check(self.own_episodes >= 0, "own_episodes", "must be >= 0", self.own_episodes)
        check(self.counterfactual_weight >= 0, "counterfactual_weight", "must be >= 0", self.counterfactual_weight)
        check(self.counterfactual_weight == 0 or self.data == "online", "counterfactual_weight",
              "needs data=online (a dataset keeps no states to label)", self.counterfactual_weight)

    @property
    def num_chunks(self) -> int:
        return self.num_updates // self.updates_per_chunk

    def swept_layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(self.layers) or tuple(range(num_layers + 1))


class LinearControllers(nnx.Module):
    """Per controlled layer (leading axis of every weight), one linear controller U_g per subgoal g."""

    def __init__(self, num_sets: int, num_subgoals: int, width: int, rank: int | None, rngs: nnx.Rngs):
        shape = (num_sets, num_subgoals, width)
        if rank:
            # U = A B^T with B = 0: U is exactly zero at the start. A is random (fan-in scale of the
            # rank -> width map), otherwise B's gradient, A^T dL/de times e, would be zero too.
            self.a = nnx.Param(jax.random.normal(rngs.params(), (*shape, rank)) / math.sqrt(rank))
            self.b = nnx.Param(jnp.zeros((*shape, rank)))
            self.u = None
        else:
            self.a = self.b = None
            self.u = nnx.Param(jnp.zeros((*shape, width)))  # [set, subgoal, out, in]

    def steer(self, index: int, e: jax.Array, subgoal: jax.Array) -> jax.Array:
        """e + U_g e with set `index`'s controller of subgoal g (an int array broadcastable to
        e.shape[:-1]). A subgoal of -1 (none left) selects no controller: e passes unchanged."""
        if self.u is not None:
            per_subgoal = jnp.einsum("...w,gvw->...gv", e, self.u[index])
        else:
            read = jnp.einsum("...w,gwr->...gr", e, self.b[index])  # B_g^T e for every g
            per_subgoal = jnp.einsum("...gr,gvr->...gv", read, self.a[index])
        chosen = jax.nn.one_hot(jnp.broadcast_to(subgoal, e.shape[:-1]), per_subgoal.shape[-2], dtype=e.dtype)
        return e + jnp.einsum("...gv,...g->...v", per_subgoal, chosen)


def make_optimizer(cfg: ControllerConfig) -> optax.GradientTransformation:
    learning_rate = optax.cosine_decay_schedule(cfg.learning_rate, cfg.num_updates, cfg.final_lr_fraction)
    return independent_along_leading_axis(adamw(learning_rate, cfg.weight_decay, cfg.max_grad_norm))


def init(key: jax.Array, cfg: ControllerConfig, base: Transformer, num_sets: int, num_subgoals: int) -> TrainState:
    """`num_sets` controller sets (one per controlled layer) for `base`; the state holds only them."""
    init_key, train_key = jax.random.split(key)
    controllers = LinearControllers(num_sets, num_subgoals, base.cfg.width, cfg.rank, nnx.Rngs(params=init_key))
    return TrainState.create(controllers, make_optimizer(cfg), train_key)


def steered_logits(base: Transformer, controllers: LinearControllers, index: int, layer: int, residual: jax.Array,
                   subgoals: jax.Array) -> jax.Array:
    """The base model's action logits with set `index` steering `residual`, the unsteered e_layer."""
    return base.upper(controllers.steer(index, residual, subgoals), layer).action_params


def steered_action_logits(base: Transformer, controllers: LinearControllers, layers: tuple[int, ...],
                          residuals: jax.Array, subgoals: jax.Array) -> list[jax.Array]:
    """The base model's action logits with set i steering layer layers[i], for every i, given the
    unsteered residuals [L + 1, B, T, width] (the blocks below a controlled layer are unchanged)."""
    return [steered_logits(base, controllers, index, layer, residuals[layer], subgoals)
            for index, layer in enumerate(layers)]


class Episodes(NamedTuple):
    """A batch of the controllers' training episodes, [B, T, ...]."""

    obs: jax.Array
    actions: jax.Array
    subgoals: jax.Array  # the ground-truth subgoal of each step, whose controller steers it
    mask: jax.Array  # the steps that happened
    counterfactual: Any = None  # `envs.experts.SubgoalStartLabels` of each step (counterfactual_weight)


Sampler = Callable[[jax.Array], Episodes]  # key -> a batch


def dataset_episodes(dataset: Any, batch_size: int) -> Sampler:
    """`sample(key)`: `batch_size` episodes of `dataset` (D*), uniformly with replacement."""
    obs, actions = jnp.asarray(dataset.obs), jnp.asarray(dataset.actions)
    subgoals, mask = jnp.asarray(dataset.subgoals), jnp.asarray(dataset.mask)

    def sample(key: jax.Array):
        episodes = jax.random.randint(key, (batch_size,), 0, obs.shape[0])
        return Episodes(obs[episodes], actions[episodes], subgoals[episodes], mask[episodes])

    return sample


def online_episodes(env: Env, env_params: Any, expert: Callable, batch_size: int,
                    counterfactual_labels: Callable | None = None) -> Sampler:
    """`sample(key)`: `batch_size` fresh episodes of D*'s clean expert (padded to the horizon),
    inside jit, with `counterfactual_labels(state, params)` at every step if given
    (`envs.experts.make_subgoal_start_labeller`)."""
    label = counterfactual_labels or (lambda state, params: None)

    def sample(key: jax.Array):
        episodes, labels = jax.vmap(lambda k: expert_data.rollout_expert_labelled(env, env_params, expert, label, k))(
            jax.random.split(key, batch_size))
        return Episodes(episodes.obs, episodes.actions, episodes.subgoals, episodes.mask, labels)

    return sample


def own_steered_episodes(env: Env, env_params: Any, expert: Callable, num_episodes: int, base: Transformer,
                         layers: tuple[int, ...]) -> Callable[[jax.Array, LinearControllers], Episodes]:
    """`sample(key, controllers)`: for every controller set, `num_episodes` closed-loop episodes of
    the base model steered by that set as it is evaluated (the current subgoal's controller,
    sampled actions), each step labelled with `expert`'s move from the state reached and with its
    ground-truth subgoal: Episodes of shape [set, B, T] (`own_episodes`)."""

    def record(state, action, next_state):
        return state

    def labelled(key, state):
        return env.observe(state, env_params), expert(key, state, env_params), env.subgoal(state, env_params)

    def one_set(key, index, layer, controllers):
        rollout_key, label_key = jax.random.split(key)
        steer = functools.partial(controllers.steer, index)
        episodes = jax.vmap(lambda k: rollout.run_episode(
            base, env, env_params, k, watch=record, steer=steer, layer=layer))(jax.random.split(rollout_key, num_episodes))
        label_keys = jax.random.split(label_key, (num_episodes, env.max_steps))
        obs, moves, subgoals = jax.vmap(jax.vmap(labelled))(label_keys, episodes.watched)
        mask = jnp.arange(env.max_steps) < episodes.length[:, None]
        return Episodes(obs, moves, subgoals, mask)

    def sample(key: jax.Array, controllers: LinearControllers) -> Episodes:
        keys = jax.random.split(key, len(layers))
        sets = [one_set(k, index, layer, controllers) for index, (k, layer) in enumerate(zip(keys, layers))]
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *sets)

    return sample


def subgoal_starts(subgoals: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, T] bool: the valid steps where a new subgoal begins (an episode's first step included).
    There the base model, which cannot see the task, must guess which subgoal comes next, and a
    controller that carries the subgoal should help most: the NLL there (`subgoal_start_nll`) is
    the controllers' clearest measure, where the mean over all steps is dominated by steps the
    base model already predicts."""
    changed = jnp.concatenate([jnp.ones_like(subgoals[:, :1], bool), subgoals[:, 1:] != subgoals[:, :-1]], axis=1)
    return changed & mask


def counterfactual_nll(base: Transformer, controllers: LinearControllers, index: int, layer: int,
                       residual: jax.Array, batch: Episodes) -> jax.Array:
    """Set `index`'s mean NLL of the clean expert's move towards subgoal g's first colour, under
    g's controller, over the steps between subgoals and every g but the step's own subgoal
    (`counterfactual_weight`). One pass of the upper blocks per g, with g steering every step
    between subgoals (as it would steer that stretch when chained) and the ground truth's
    controllers the others, so a later stretch between subgoals sees earlier ones steered by g too."""
    labels = batch.counterfactual
    between = labels.between_subgoals & batch.mask
    num_subgoals = labels.moves.shape[-2]

    def towards(g):
        steered = controllers.steer(index, residual, jnp.where(between, g, batch.subgoals))
        return base.action_dist.target_nll(base.upper(steered, layer).action_params, labels.moves[..., g, :])

    nll = jnp.stack([towards(g) for g in range(num_subgoals)], axis=-1)  # [B, T, G]
    return masked_mean(nll, between[..., None] & (jnp.arange(num_subgoals) != batch.subgoals[..., None]))


def make_train_chunk(cfg: ControllerConfig, base: Transformer, layers: tuple[int, ...], sample_episodes: Sampler,
                     mesh: Mesh | None = None, sample_own: Callable | None = None
                     ) -> Callable[[TrainState], tuple[TrainState, dict]]:
    """A jitted `train_chunk(state) -> (state, metrics)` of `cfg.updates_per_chunk` updates on
    batches from `sample_episodes`: `action_nll/layer_l`, `subgoal_start_nll/layer_l` and
    `action_accuracy/layer_l` per controlled layer (with `counterfactual_weight`, also
    `counterfactual_nll/layer_l`), and the unsteered base model's `base_action_nll` and
    `base_subgoal_start_nll` on the same batches. With `sample_own` (`own_steered_episodes`,
    `own_episodes` > 0), each set's loss adds its NLL on its own episodes (`own_action_nll/layer_l`)."""
    optimizer = make_optimizer(cfg)

    def own_nll(controllers, own: Episodes | None, own_residuals: list[jax.Array]) -> jax.Array:
        if own is None:
            return jnp.zeros(len(layers))
        return jnp.stack([
            masked_mean(base.action_dist.nll(
                steered_logits(base, controllers, index, layer, residual, own.subgoals[index]), own.actions[index]),
                own.mask[index])
            for index, (layer, residual) in enumerate(zip(layers, own_residuals))])

    def loss_fn(params, graphdef, residuals, batch: Episodes, own: Episodes | None, own_residuals: list[jax.Array]):
        controllers = nnx.merge(graphdef, params)
        all_logits = steered_action_logits(base, controllers, layers, residuals, batch.subgoals)
        step_nll = [base.action_dist.nll(logits, batch.actions) for logits in all_logits]
        starts = subgoal_starts(batch.subgoals, batch.mask)
        nll = jnp.stack([masked_mean(values, batch.mask) for values in step_nll])
        start_nll = jnp.stack([masked_mean(values, starts) for values in step_nll])
        accuracy = jnp.stack([masked_mean(base.action_dist.fit(logits, batch.actions), batch.mask)
                              for logits in all_logits])
        if cfg.counterfactual_weight == 0:
            counterfactual = jnp.zeros_like(nll)
        else:
            counterfactual = jnp.stack([counterfactual_nll(base, controllers, index, layer, residuals[layer], batch)
                                        for index, layer in enumerate(layers)])
        own = own_nll(controllers, own, own_residuals)
        # The sets share no parameter: each gets its own gradient.
        total = nll + cfg.counterfactual_weight * counterfactual + own
        return jnp.sum(total), (nll, start_nll, accuracy, counterfactual, own)

    def update(state: TrainState, _):
        key, batch_key = jax.random.split(state.key)
        batch = shard_batch(sample_episodes(batch_key), mesh)
        unsteered = base(batch.obs)  # outside the differentiated function: the base is frozen
        # fold_in: the draws without own episodes stay those of the code before them
        own = None if sample_own is None else sample_own(jax.random.fold_in(batch_key, 1), state.module())
        own_residuals = [] if own is None else [base.lower(own.obs[index], layer) for index, layer in enumerate(layers)]
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, terms), grads = grad_fn(state.params, state.graphdef, unsteered.residuals, batch, own, own_residuals)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        base_step_nll = base.action_dist.nll(unsteered.action_params, batch.actions)
        base_nll = (masked_mean(base_step_nll, batch.mask),
                    masked_mean(base_step_nll, subgoal_starts(batch.subgoals, batch.mask)))
        return state.replace(params=params, opt_state=opt_state, key=key), (terms, base_nll)

    @jax.jit
    def train_chunk(state: TrainState):
        state, ((nll, start_nll, accuracy, counterfactual, own), (base_nll, base_start_nll)) = jax.lax.scan(
            update, state, length=cfg.updates_per_chunk)
        metrics = {"base_action_nll": base_nll.mean(), "base_subgoal_start_nll": base_start_nll.mean()}
        for index, layer in enumerate(layers):
            metrics[f"action_nll/layer_{layer}"] = nll[:, index].mean()
            metrics[f"subgoal_start_nll/layer_{layer}"] = start_nll[:, index].mean()
            metrics[f"{base.action_dist.fit_metric}/layer_{layer}"] = accuracy[:, index].mean()
            if cfg.counterfactual_weight > 0:
                metrics[f"counterfactual_nll/layer_{layer}"] = counterfactual[:, index].mean()
            if sample_own is not None:
                metrics[f"own_action_nll/layer_{layer}"] = own[:, index].mean()
        return state, metrics

    return train_chunk


def chained_success_and_progress(base: Transformer, env: Env, params: Any, keys: jax.Array, steer: rollout.Steer,
                                 layer: int, greedy: bool = False) -> tuple[jax.Array, jax.Array]:
    """Success rate and mean progress of the steered episodes (`rollout.run_episode`), one per key."""
    episodes = jax.vmap(lambda k: rollout.run_episode(base, env, params, k, greedy=greedy, steer=steer, layer=layer))(
        keys)
    return jnp.mean(episodes.success), jnp.mean(episodes.progress)


def make_evaluate(cfg: ControllerConfig, base: Transformer, layers: tuple[int, ...], env: Env, key: jax.Array
                  ) -> Callable[[TrainState], dict]:
    """A jitted `evaluate(state)`: the chained controllers per controlled layer, on the
    post-training task (`posttrain_success/layer_l`, `posttrain_progress/layer_l`) and, in
    distribution, on the pretraining tasks, one drawn per episode (`pretrain_success/layer_l`,
    `pretrain_progress/layer_l`). The second tells controllers that cannot steer at all from
    controllers that steer but do not compose the post-training task's unseen transitions. Actions
    are sampled, and again the most likely (`posttrain_greedy_success/layer_l`, ...). The episode
    keys are fixed, so every evaluation (and every layer) sees the same layouts."""
    task_sets = {"posttrain": env.posttrain_params(), "pretrain": env.pretrain_params()}
    keys = jax.random.split(key, cfg.eval_episodes)

    @jax.jit
    def evaluate(state: TrainState):
        controllers = state.module()
        metrics = {}
        for index, layer in enumerate(layers):
            steer = functools.partial(controllers.steer, index)
            for (name, params), (decoding, greedy) in itertools.product(task_sets.items(), rollout.DECODINGS):
                success, progress = chained_success_and_progress(base, env, params, keys, steer, layer, greedy)
                metrics[f"{name}_{decoding}success/layer_{layer}"] = success
                metrics[f"{name}_{decoding}progress/layer_{layer}"] = progress
        return metrics

    return evaluate


def transition_pairs(env: Env) -> tuple[list[tuple[int, int]], list[bool]]:
    """Every ordered pair (X, Y) of distinct subgoals, and whether a pretraining task has X -> Y."""
    seen = pinpad.subgoal_transitions(env.pretrain_subgoal_sequences)
    pairs = [(x, y) for x in range(env.num_subgoals) for y in range(env.num_subgoals) if x != y]
    return pairs, [pair in seen for pair in pairs]


def make_evaluate_transitions(cfg: ControllerConfig, base: Transformer, layers: tuple[int, ...], env: Env,
                              key: jax.Array) -> Callable[[TrainState], dict]:
    """A jitted `evaluate_transitions(state)`: per controlled layer, the chained controllers'
    success and mean progress on every two-subgoal task X-Y (`transition_success/layer_l`,
    `transition_progress/layer_l`: [pair] in the order of `transition_pairs`), on the same fixed
    layouts for every pair. It separates what the post-training task's chain mixes: a pair whose
    transition some pretraining task has against one that none has (the post-training task's
    kind), at the same length."""
    pairs, _ = transition_pairs(env)
    tasks = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(env.subgoal_task_params(pair) for pair in pairs))
    keys = jax.random.split(key, cfg.eval_episodes)

    @jax.jit
    def evaluate_transitions(state: TrainState):
        controllers = state.module()
        metrics = {}
        for index, layer in enumerate(layers):
            steer = functools.partial(controllers.steer, index)
            success, progress = jax.vmap(
                lambda params: chained_success_and_progress(base, env, params, keys, steer, layer))(tasks)
            metrics[f"transition_success/layer_{layer}"] = success
            metrics[f"transition_progress/layer_{layer}"] = progress
        return metrics

    return evaluate_transitions


def summarise_transitions(env: Env, layers: tuple[int, ...], metrics: dict) -> dict[str, dict]:
    """`make_evaluate_transitions`' metrics as {"seen"|"unseen": {layer: mean success}} and
    {"pairs": {layer: {"X->Y": success}}} (subgoal indices)."""
    pairs, seen = transition_pairs(env)
    seen = np.asarray(seen)
    summary = {"seen": {}, "unseen": {}, "pairs": {}}
    for layer in layers:
        success = np.asarray(metrics[f"transition_success/layer_{layer}"], dtype=float)
        summary["seen"][str(layer)] = float(success[seen].mean())
        summary["unseen"][str(layer)] = float(success[~seen].mean())
        summary["pairs"][str(layer)] = {f"{x}->{y}": float(value) for (x, y), value in zip(pairs, success)}
    return summary


def evaluate_base(cfg: ControllerConfig, base: Transformer, env: Env, key: jax.Array) -> dict[str, float]:
    """The unsteered base model on the same post-training episodes as `make_evaluate(..., key)`,
    sampling (`success_rate`, ...) and greedy (`greedy_success_rate`, ...)."""
    keys = jax.random.split(key, cfg.eval_episodes)
    metrics = {}
    for decoding, greedy in rollout.DECODINGS:
        results = jax.jit(lambda: rollout.evaluate(base, env, env.posttrain_params(), keys, greedy))()
        metrics.update({f"{decoding}{name}": float(value) for name, value in results.items()})
    return metrics
