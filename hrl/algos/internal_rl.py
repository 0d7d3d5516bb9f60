"""Phase 3: internal RL. Reinforcement learning over the metacontroller's abstract actions.

The frozen base model, the frozen switching unit and the frozen decoder become part of the
environment (`AbstractActionEnv`). Its action is a latent z; its observation is the base model's
unsteered residual e_{t,l} at the step where the switching unit fired. One abstract step: the base
model acts (raw actions sampled from its own head) with e_l <- e_l + U(z) e_l until the switching
unit fires again (beta_t >= threshold) or the episode ends; the reward collected meanwhile is the
step's reward. The first step of an episode is always a switch (there is no z yet).

A causal policy pi(z | e at the switch times so far) replaces the metacontroller's non-causal
encoder: a read-in, one Hawk recurrent block (hrl.models.hawk; paper: a one-layer recurrent model
of width 256) and a Gaussian head that starts at exactly N(0, I), the prior the decoder was trained
under (paper: sampling z from the prior gives the best initial success).

The update (paper): PPO's clipped surrogate over the abstract steps, no critic: every abstract step
of an episode has the advantage of the episode's return z-scored over the whole batch (std + 1e-3);
no KL term, no entropy bonus. Clip epsilon, epochs and minibatches are ours (DECIDE).

Why a raw-step scan for training: `AbstractActionEnv.step` runs the raw steps of one abstract step
in a `while_loop`; vmapped over a batch, every abstract step then costs its longest member, and the
episodes' switch times differ. The training rollout (`rollout`) instead scans the horizon's raw
steps once and consults the policy where a switch is due; both use the same `raw_step`, and a test
checks that they give the same episodes. The decisions are then packed to the front of each
episode's row (`pack_decisions`) for the update, which runs the policy over them as a sequence.

Variants, by the metacontroller they are given (the stage picks the discovery run): the paper's
(frozen base), beta = 1 (a decision at every raw step) and co-trained (with its own base model).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from envs.base import Env
from hrl.infra.config import check
from hrl.infra.mesh import Mesh, shard_batch
from hrl.infra.objectives import clipped_surrogate, epochs_of_minibatches, on_policy_chunk, zscore
from hrl.infra.train_state import TrainState
from hrl.models.hawk import HawkConfig, RecurrentBlock
from hrl.models.metacontroller import Metacontroller
from hrl.models.transformer import ResidualStreamModel


@dataclasses.dataclass
class InternalRLConfig:
    """Paper (grid): batch 1024 episodes, lr 3e-5 (scanned 3e-6..3e-4), a recurrent policy of width 256."""

    alpha: float = 0.17  # the discovery run's alpha whose metacontroller is used (one of discovery.alphas)
    policy_width: int = 256
    learning_rate: float = 3e-5
    max_grad_norm: float = 1.0
    batch_size: int = 1024  # episodes per update
    epochs: int = 1  # passes over each batch (DECIDE)
    minibatches: int = 1  # gradient steps per pass (DECIDE)
    clip_epsilon: float = 0.2  # DECIDE: PPO's usual value
    switch_threshold: float = 0.5  # beta >= threshold starts a new abstract step (paper)
    num_updates: int = 1000
    updates_per_chunk: int = 10
    eval_episodes: int = 256

    def validate(self) -> None:
        for name in ("policy_width", "learning_rate", "max_grad_norm", "batch_size", "epochs", "minibatches",
                     "clip_epsilon", "num_updates", "updates_per_chunk", "eval_episodes"):
            check(getattr(self, name) > 0, name, "must be > 0", getattr(self, name))
        check(0 < self.switch_threshold < 1, "switch_threshold", "must be in (0, 1)", self.switch_threshold)
        check(self.batch_size % self.minibatches == 0, "minibatches",
              f"must divide batch_size ({self.batch_size})", self.minibatches)
        check(self.num_updates % self.updates_per_chunk == 0, "num_updates",
              f"must be a multiple of updates_per_chunk ({self.updates_per_chunk})", self.num_updates)

    @property
    def num_chunks(self) -> int:
        return self.num_updates // self.updates_per_chunk


# ----------------------------------------------------------------------------------------------
# The abstract-action environment


class AbstractState(NamedTuple):
    """One episode between raw steps. Raw step t is half begun: the base model's lower blocks have
    run on o_t (`cache`, `e`) and the switching unit has judged it (`beta`)."""

    key: jax.Array  # the episode's key: raw step t draws from fold_in(key, t)
    t: jax.Array
    env_state: Any
    cache: Any  # the base model's cache, with step t's lower blocks done
    e: jax.Array  # e_{t,l}, unsteered
    history: jax.Array  # the switching unit's history h_{t-1}
    z: jax.Array  # the latent in force (z_{t-1})
    beta: jax.Array  # beta_t = gate(e_t, h_{t-1}, z_{t-1})
    done: jax.Array
    success: jax.Array
    progress: jax.Array


class AbstractActionEnv:
    """The frozen base model, switching unit and decoder around a raw environment: actions are
    latents z, observations are residuals e at switch times. Pure functions; jit and vmap them."""

    def __init__(self, env: Env, env_params: Any, base: ResidualStreamModel, metacontroller: Metacontroller,
                 layer: int, switch_threshold: float = 0.5):
        self.env, self.env_params = env, env_params
        self.base, self.metacontroller = base, metacontroller
        self.layer, self.switch_threshold = layer, switch_threshold

    @property
    def latent_size(self) -> int:
        return self.metacontroller.cfg.latent_size

    def reset(self, key: jax.Array) -> tuple[jax.Array, AbstractState]:
        """A new episode, paused at its first raw step (always a switch): (e_0, state)."""
        reset_key, run_key = jax.random.split(key)
        obs, env_state = self.env.reset(reset_key, self.env_params)
        meta = self.metacontroller
        state = AbstractState(
            key=run_key, t=jnp.int32(0), env_state=env_state, cache=self.base.init_cache(), e=jnp.zeros(self.base.cfg.width),
            history=jnp.zeros(meta.cfg.history_size), z=jnp.zeros(meta.cfg.latent_size), beta=jnp.float32(1.0),
            done=jnp.bool_(False), success=jnp.bool_(False), progress=jnp.int32(0))
        state = self._begin_raw_step(state, obs)
        return state.e, state

    def switch_due(self, state: AbstractState) -> jax.Array:
        """Does raw step t start a new abstract step (a new z)? Never once the episode is over."""
        return ~state.done & ((state.t == 0) | (state.beta >= self.switch_threshold))

    def raw_step(self, state: AbstractState, z: jax.Array) -> tuple[AbstractState, jax.Array]:
        """Finish raw step t steered by U(z), step the environment, begin step t + 1. Returns the
        new state and the reward; an ended episode stays as it was, with reward 0."""
        act_key, env_key = jax.random.split(jax.random.fold_in(state.key, state.t))
        steered = self.metacontroller.steer(state.e, z)
        out, cache = self.base.step_upper(state.cache, steered, self.layer)
        action = self.base.action_dist.sample(out.action_params, act_key)
        obs, env_state, reward, terminated, truncated, info = self.env.step(env_key, state.env_state, action,
                                                                            self.env_params)
        history, _ = self.metacontroller.history(state.history, state.e)
        moved = state._replace(t=state.t + 1, env_state=env_state, cache=cache, history=history, z=z,
                               done=terminated | truncated, success=info["success"], progress=info["progress"])
        moved = self._begin_raw_step(moved, obs)
        frozen = jax.tree.map(lambda old, new: jnp.where(state.done, old, new), state, moved)
        return frozen, jnp.where(state.done, 0.0, reward)

    def step(self, state: AbstractState, z: jax.Array) -> tuple[jax.Array, AbstractState, jax.Array, jax.Array]:
        """One abstract step: raw steps with U(z) until the switching unit fires or the episode
        ends. Returns (e at the next switch, state, reward collected, done)."""
        state, reward = self.raw_step(state, z)

        def going_on(carry):
            state, _ = carry
            return ~state.done & (state.beta < self.switch_threshold)

        def act(carry):
            state, total = carry
            state, reward = self.raw_step(state, state.z)
            return state, total + reward

        state, reward = jax.lax.while_loop(going_on, act, (state, reward))
        return state.e, state, reward, state.done

    def _begin_raw_step(self, state: AbstractState, obs: jax.Array) -> AbstractState:
        e, cache = self.base.step_lower(state.cache, obs, self.layer)
        return state._replace(e=e, cache=cache, beta=self.metacontroller.gate(e, state.history, state.z))


# ----------------------------------------------------------------------------------------------
# The policy over z


LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # keeps log-probabilities finite if the policy narrows fast


class AbstractPolicy(nnx.Module):
    """pi(z | e at the switch times so far): read-in, one Hawk recurrent block, Gaussian head.
    The head starts at zero: the first policy is exactly the prior N(0, I)."""

    def __init__(self, residual_width: int, latent_size: int, width: int, *, rngs: nnx.Rngs):
        core = HawkConfig(num_layers=1, width=width, rnn_width=width, mlp_width=2 * width)
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.read_in = nnx.Linear(residual_width, width, rngs=rngs)
        self.core = RecurrentBlock(core, init, rngs)
        self.norm = nnx.RMSNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, 2 * latent_size, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)
        self.conv_width = core.conv_width

    def __call__(self, e: jax.Array) -> tuple[jax.Array, jax.Array]:
        """e [K, residual width], the decisions of one episode in order -> mean, log std [K, latent]."""
        return self._gaussian(self.core(self.read_in(e)))

    def init_carry(self) -> tuple[jax.Array, jax.Array]:
        width = self.read_in.out_features
        return jnp.zeros(width), jnp.zeros((self.conv_width - 1, width))

    def step(self, carry, e: jax.Array):
        """One decision: (carry, e [residual width]) -> (carry, (mean, log std))."""
        x, carry = self.core.step(carry, self.read_in(e))
        return carry, self._gaussian(x)

    def _gaussian(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean, log_std = jnp.split(self.head(self.norm(x)), 2, axis=-1)
        return mean, jnp.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)


def gaussian_log_prob(z: jax.Array, mean: jax.Array, log_std: jax.Array) -> jax.Array:
    """log N(z; mean, diag(exp(log_std)^2)), summed over the last axis."""
    return jnp.sum(-0.5 * jnp.square((z - mean) * jnp.exp(-log_std)) - log_std - 0.5 * math.log(2 * math.pi), axis=-1)


# ----------------------------------------------------------------------------------------------
# Rollouts


class Decisions(NamedTuple):
    """One episode's decisions, packed to the front of a row of `horizon` slots."""

    e: jax.Array  # [K, width] the policy's inputs
    z: jax.Array  # [K, latent] the chosen latents
    log_prob: jax.Array  # [K] under the policy that chose them
    mask: jax.Array  # [K] which slots hold a decision


class Episode(NamedTuple):
    decisions: Decisions
    success: jax.Array
    progress: jax.Array
    length: jax.Array  # raw steps
    episode_return: jax.Array


def rollout(abstract_env: AbstractActionEnv, policy: AbstractPolicy, key: jax.Array, greedy: bool = False) -> Episode:
    """One episode: the horizon's raw steps in one scan; where a switch is due the policy draws z
    (its mean if greedy) from e_t, elsewhere the z in force carries on."""
    env_key, policy_key = jax.random.split(key)
    _, state = abstract_env.reset(env_key)
    noise = jax.random.normal(policy_key, (abstract_env.env.max_steps, abstract_env.latent_size))

    def body(carry, noise_t):
        state, policy_carry, total = carry
        due = abstract_env.switch_due(state)
        new_policy_carry, (mean, log_std) = policy.step(policy_carry, state.e)
        z = mean if greedy else mean + jnp.exp(log_std) * noise_t
        log_prob = gaussian_log_prob(z, mean, log_std)
        policy_carry = jax.tree.map(lambda new, old: jnp.where(due, new, old), new_policy_carry, policy_carry)
        e = state.e
        state, reward = abstract_env.raw_step(state, jnp.where(due, z, state.z))
        return (state, policy_carry, total + reward), Decisions(e, z, log_prob, due)

    start = (state, policy.init_carry(), jnp.float32(0.0))
    (state, _, total), decisions = jax.lax.scan(body, start, noise)
    return Episode(pack_decisions(decisions), state.success, state.progress, state.t, total)


def pack_decisions(decisions: Decisions) -> Decisions:
    """Moves the slots holding a decision to the front, in order (the policy runs over them as a sequence)."""
    order = jnp.argsort(~decisions.mask, stable=True)
    return jax.tree.map(lambda x: x[order], decisions)


# ----------------------------------------------------------------------------------------------
# Training


def make_optimizer(cfg: InternalRLConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(cfg.learning_rate))


def init(key: jax.Array, cfg: InternalRLConfig, abstract_env: AbstractActionEnv) -> TrainState:
    init_key, train_key = jax.random.split(key)
    policy = AbstractPolicy(abstract_env.base.cfg.width, abstract_env.latent_size, cfg.policy_width,
                            rngs=nnx.Rngs(params=init_key))
    return TrainState.create(policy, make_optimizer(cfg), train_key)


def policy_loss(cfg: InternalRLConfig, graphdef: nnx.GraphDef, params: Any, batch: tuple[Decisions, jax.Array]
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Minus the clipped surrogate over a minibatch's decisions (advantages per episode)."""
    decisions, advantages = batch
    mean, log_std = jax.vmap(nnx.merge(graphdef, params))(decisions.e)
    log_prob = gaussian_log_prob(decisions.z, mean, log_std)
    objective, stats = clipped_surrogate(log_prob, decisions.log_prob, advantages[:, None], decisions.mask,
                                         cfg.clip_epsilon)
    return -objective, stats


def make_train_chunk(cfg: InternalRLConfig, abstract_env: AbstractActionEnv, mesh: Mesh | None = None
                     ) -> Callable[[TrainState], tuple[TrainState, dict]]:
    """A jitted `train_chunk(state)`: `updates_per_chunk` times, a batch of episodes with the
    current policy, then the clipped updates. Metrics: the batches' success rate, return,
    decisions (abstract steps) per episode, length, progress, the update's statistics, and
    `episodes`, the training episodes so far (the x axis of the paper's Fig. 8). With a `mesh`, the
    rollouts and each minibatch are split over its devices (the z-scoring stays batch-wide)."""
    optimizer = make_optimizer(cfg)

    def update(state: TrainState, _):
        key, rollout_key, update_key = jax.random.split(state.key, 3)
        policy = state.module()
        keys = shard_batch(jax.random.split(rollout_key, cfg.batch_size), mesh)
        episodes = shard_batch(jax.vmap(lambda k: rollout(abstract_env, policy, k))(keys), mesh)
        advantages = zscore(episodes.episode_return)
        loss = lambda params, batch: policy_loss(cfg, state.graphdef, params, shard_batch(batch, mesh))  # noqa: E731
        params, opt_state, stats = epochs_of_minibatches(loss, optimizer, state.params, state.opt_state,
                                                         (episodes.decisions, advantages), update_key,
                                                         cfg.epochs, cfg.minibatches)
        metrics = {"success_rate": episodes.success.mean(), "return": episodes.episode_return.mean(),
                   "decisions_per_episode": episodes.decisions.mask.sum(-1).mean(),
                   "episode_length": episodes.length.mean(), "progress": episodes.progress.mean(), **stats}
        return state.replace(params=params, opt_state=opt_state, key=key), metrics

    return on_policy_chunk(update, cfg.updates_per_chunk, cfg.batch_size, cfg.epochs * cfg.minibatches)


def make_evaluate(cfg: InternalRLConfig, abstract_env: AbstractActionEnv, key: jax.Array
                  ) -> Callable[[TrainState], dict[str, jax.Array]]:
    """A jitted `evaluate(state)` on `eval_episodes` layouts fixed by `key`: `success_rate` with z
    sampled (as trained) and `greedy_success_rate` with the policy's mean, and the decisions per episode."""
    keys = jax.random.split(key, cfg.eval_episodes)

    @jax.jit
    def evaluate(state: TrainState):
        policy = state.module()
        metrics = {}
        for prefix, greedy in (("", False), ("greedy_", True)):
            episodes = jax.vmap(lambda k: rollout(abstract_env, policy, k, greedy))(keys)
            metrics[prefix + "success_rate"] = episodes.success.mean()
            metrics[prefix + "decisions_per_episode"] = episodes.decisions.mask.sum(-1).mean()
        return metrics

    return evaluate
