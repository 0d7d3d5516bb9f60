"""Deep contrastive goal-conditioned RL (CRL; Eysenbach et al. 2022, with the deep residual
networks of Wang et al. 2025, "1000 Layer Networks for Self-Supervised RL").

No reward is used to train. The critic is an energy between a state-action representation and a
goal representation,

    f(s, a, g) = -sqrt(||phi(s, a) - psi(g)||^2 + epsilon)

(epsilon: the goal can equal the state, and the gradient of a norm at 0 is NaN), trained by
forward InfoNCE: for a batch of B (s, a, g) triples, the B x B matrix of f (rows: state-actions,
columns: goals) is a classification of each row's own goal (the diagonal) among the batch's goals,
plus `logsumexp_penalty` x mean over rows of logsumexp(row)^2 (JaxGCRL's form), which pins the
free per-row offset of the logits. The actor is SAC-style: loss = E_{a ~ pi}[alpha log pi(a|s,g)
- f(s, a, g)] with alpha tuned towards a target entropy (log alpha starts at 0).

Goals come from hindsight: a transition at step t of an episode gets as its goal the achieved
goal of the state at t + k of the same episode, P(k) proportional to `discount`^k for k >= 1.
Truncation (DECIDE): k is drawn from that law restricted to 1 <= k <= K, K being the number of
the episode's steps stored from t on (the state at t + K is the episode's last one: its final
observation, the terminal state included), i.e. P(k) = discount^(k-1) (1 - discount) /
(1 - discount^K), by inverting its CDF. Steps near an episode's end thus get close goals rather
than being dropped or re-drawn.

Pieces, all on the device, one jitted `train_chunk` per chunk:
- `TrajectoryBuffer`: per environment a circular time axis of `buffer_steps` transitions
  (observation, action, achieved goal of the next observation, episode number). Episodes lie
  whole and in order along it, so "the same episode" is "the same episode number", found by
  looking ahead at most a horizon.
- an iteration: every one of `num_envs` environments takes `unroll_length` steps with the current
  policy, commanded the environment's own goal (`desired_goal`), written to the buffer; then
  `updates_per_iteration` gradient updates, each on a fresh relabelled batch. Env steps per update
  = num_envs x unroll_length / updates_per_iteration (the spec's 1:16 to 1:40).
- `train_chunk` runs `iterations_per_chunk` iterations in `lax.scan`.

Actions (DECIDE, the spec says "the same structure" for discrete ones):
- discrete (the grid): a categorical actor; phi sees the one-hot action next to the state. The
  actor loss and the entropy are exact sums over the actions (no sampling: 4 actions), and the
  target entropy is `target_entropy_fraction` x log|A| (default 0.5: halfway between a
  deterministic policy, 0, and the uniform one, log|A|; on GridGoal-v0 at width 128, one run
  each of 5600 updates, 0.2 ended at 0.875 success against 0.945 for 0.5).
- continuous (the ant, later): a tanh-squashed Gaussian, log-std squashed into [-5, 2], actions in
  [-1, 1], reparameterised samples; target entropy -0.5 x action dimension (the spec's).

Goal spaces (the environment's `envs.goals.GoalEnv` interface, chosen by `env.name`):
- GridGoal-v0 (grid goal reaching, to test the agent): the goal is a cell, one-hot; a state's
  goal-relevant part is the agent's cell.
- GridPinpadGoal-v0 (the post-training task, the baseline of the paper's Fig. 8), DECIDE: the
  state is the grid observation plus the one-hot count of colours correctly visited so far
  (0..12) and the goal is the progress one-hot alone, commanded and evaluated as "progress = 12,
  the task is complete". Why: the task is hidden and an MLP policy is memoryless, so it needs the
  count (the base model could infer it from its history), and a goal made of the count alone says
  exactly "complete the task" without fixing where the agent must stand. Position is left out of
  the goal: in hindsight it would make the relabelled goals mostly about position, which the
  evaluation goal never asks for. Relabelled goals then teach how to raise the count; "12" is
  only reachable in the data once exploration completes the task (in the quick preset's 6000
  updates it never did: 0% success, README).
- the ant's (x, y) and ant-pinpad goals plug in the same way once `envs` has those environments.

Evaluation: `eval_episodes` episodes on fixed layouts (keys fixed by the run's key), commanded
the environment's goal; success is the environment's `info["success"]`. Two numbers per
evaluation, on the same layouts: `success_rate` acting as the agent was trained to act (actions
sampled from the policy; the headline figure) and `greedy_success_rate` (argmax; tanh of the
mean). On the grid a greedy memoryless policy can lock into a loop (e.g. pushing into a wall
forever) that sampling escapes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from envs.base import Discrete
from envs.goals import GoalEnv
from envs.wrappers import VmapAutoReset
from hrl.infra.config import check
from hrl.infra.mesh import Mesh, shard_along, shard_batch
from hrl.models.resnet import ResidualMLP, ResNetConfig

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # the spec's squashing range of the Gaussian actor


@dataclasses.dataclass
class CRLConfig:
    """Paper defaults (JaxGCRL / 1000-layer networks): Adam 3e-4 everywhere, batch 256-512,
    256-512 parallel environments, representations of 64, width 256, depth 4 (their baseline)."""

    num_envs: int = 256
    unroll_length: int = 16  # steps per environment per iteration
    updates_per_iteration: int = 256  # gradient updates per iteration
    batch_size: int = 256
    num_iterations: int = 100
    iterations_per_chunk: int = 5  # one host round trip (metrics, progress) per chunk
    buffer_steps: int = 1024  # transitions kept per environment (circular); a multiple of unroll_length
    prefill_steps: int = 64  # steps per environment with uniform random actions before training
    discount: float = 0.99  # the geometric law of the hindsight goal's offset
    representation_dim: int = 64
    energy_epsilon: float = 1e-6  # inside the square root of the energy
    logsumexp_penalty: float = 0.1
    critic_learning_rate: float = 3e-4
    actor_learning_rate: float = 3e-4
    alpha_learning_rate: float = 3e-4
    target_entropy_fraction: float = 0.5  # discrete actions: target entropy = this x log|A|
    target_entropy_per_dim: float = -0.5  # continuous actions: target entropy = this x action dim
    sa_encoder: ResNetConfig = dataclasses.field(default_factory=ResNetConfig)  # phi(s, a)
    goal_encoder: ResNetConfig = dataclasses.field(default_factory=ResNetConfig)  # psi(g)
    actor: ResNetConfig = dataclasses.field(default_factory=ResNetConfig)
    eval_episodes: int = 256

    def validate(self) -> None:
        for name in ("num_envs", "unroll_length", "updates_per_iteration", "batch_size", "num_iterations",
                     "iterations_per_chunk", "buffer_steps", "representation_dim", "critic_learning_rate",
                     "actor_learning_rate", "alpha_learning_rate", "energy_epsilon", "eval_episodes"):
            check(getattr(self, name) > 0, name, "must be > 0", getattr(self, name))
        check(0 < self.discount < 1, "discount", "must be in (0, 1)", self.discount)
        check(self.logsumexp_penalty >= 0, "logsumexp_penalty", "must be >= 0", self.logsumexp_penalty)
        check(self.prefill_steps >= 0 and self.prefill_steps % self.unroll_length == 0, "prefill_steps",
              f"must be a multiple of unroll_length ({self.unroll_length}), >= 0", self.prefill_steps)
        check(self.buffer_steps % self.unroll_length == 0, "buffer_steps",
              f"must be a multiple of unroll_length ({self.unroll_length})", self.buffer_steps)
        check(self.num_iterations % self.iterations_per_chunk == 0, "num_iterations",
              f"must be a multiple of iterations_per_chunk ({self.iterations_per_chunk})", self.num_iterations)
        check(0 <= self.target_entropy_fraction <= 1, "target_entropy_fraction", "must be in [0, 1]",
              self.target_entropy_fraction)

    @property
    def num_chunks(self) -> int:
        return self.num_iterations // self.iterations_per_chunk

    @property
    def updates_per_chunk(self) -> int:
        return self.iterations_per_chunk * self.updates_per_iteration


def check_env_fits(cfg: CRLConfig, env: GoalEnv) -> None:
    """Refuse an environment CRL cannot run on, naming the config key when a size is the cause."""
    check(isinstance(env, GoalEnv), "env.name", "CRL needs a goal-reaching environment (envs.goals.GoalEnv: "
          "GridGoal-v0, GridPinpadGoal-v0)", env.name)
    # The relabelling looks ahead one horizon from a stored step; in a longer buffer that window
    # cannot wrap around to the same episode's own earlier steps.
    check(cfg.buffer_steps > env.max_steps, "crl.buffer_steps",
          f"must exceed the environment's horizon ({env.max_steps})", cfg.buffer_steps)


# ----------------------------------------------------------------------------------------------
# Networks


class Critic(nnx.Module):
    """phi(s, a) and psi(g), each a residual MLP ending in a `representation_dim` vector."""

    def __init__(self, obs_dim: int, action_dim: int, goal_dim: int, cfg: CRLConfig, rngs: nnx.Rngs):
        self.sa_encoder = ResidualMLP(obs_dim + action_dim, cfg.representation_dim, cfg.sa_encoder, rngs)
        self.goal_encoder = ResidualMLP(goal_dim, cfg.representation_dim, cfg.goal_encoder, rngs)


class Actor(nnx.Module):
    """(s, g) -> logits [A] (discrete) or Gaussian mean and raw log-std [2 x action dim]."""

    def __init__(self, obs_dim: int, goal_dim: int, policy_outputs: int, cfg: CRLConfig, rngs: nnx.Rngs):
        self.net = ResidualMLP(obs_dim + goal_dim, policy_outputs, cfg.actor, rngs)

    def __call__(self, obs: jax.Array, goal: jax.Array) -> jax.Array:
        return self.net(jnp.concatenate([obs.astype(jnp.float32), goal.astype(jnp.float32)], axis=-1))


def energy(sa_repr: jax.Array, goal_repr: jax.Array, epsilon: float) -> jax.Array:
    """f = -||phi - psi||, with `epsilon` inside the root; broadcasts over leading axes."""
    return -jnp.sqrt(jnp.sum(jnp.square(sa_repr - goal_repr), axis=-1) + epsilon)


def infonce_loss(logits: jax.Array, logsumexp_penalty: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Forward InfoNCE on a B x B logit matrix (row i's positive is column i), plus the penalty
    `logsumexp_penalty` x mean_i logsumexp(row i)^2."""
    row_logsumexp = jax.nn.logsumexp(logits, axis=1)
    positives = jnp.diag(logits)
    infonce = jnp.mean(row_logsumexp - positives)
    penalty = logsumexp_penalty * jnp.mean(jnp.square(row_logsumexp))
    metrics = {
        "critic/infonce": infonce,
        "critic/logsumexp_penalty": penalty,
        "critic/accuracy": jnp.mean(jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0])),
        "critic/logits_positive": jnp.mean(positives),
        "critic/logits_negative": (jnp.sum(logits) - jnp.sum(positives)) / (logits.size - logits.shape[0]),
    }
    return infonce + penalty, metrics


# ----------------------------------------------------------------------------------------------
# The policy: categorical for discrete actions, tanh-Gaussian for continuous ones


class ActionCoding(NamedTuple):
    """How actions are fed to phi and drawn from the actor's outputs."""

    discrete: bool
    size: int  # actions (discrete) or action dimensions (continuous)

    @property
    def policy_outputs(self) -> int:
        return self.size if self.discrete else 2 * self.size

    @property
    def critic_input(self) -> int:
        return self.size

    def encode(self, action: jax.Array) -> jax.Array:
        """What phi sees next to the state: the one-hot action, or the action itself."""
        return jax.nn.one_hot(action, self.size) if self.discrete else action

    def target_entropy(self, cfg: CRLConfig) -> float:
        if self.discrete:
            return cfg.target_entropy_fraction * math.log(self.size)
        return cfg.target_entropy_per_dim * self.size

    def sample(self, outputs: jax.Array, key: jax.Array) -> jax.Array:
        if self.discrete:
            return jax.random.categorical(key, outputs)
        return squashed_gaussian_sample(outputs, key)[0]

    def greedy(self, outputs: jax.Array) -> jax.Array:
        if self.discrete:
            return jnp.argmax(outputs, axis=-1)
        mean, _ = jnp.split(outputs, 2, axis=-1)
        return jnp.tanh(mean)

    def random(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        if self.discrete:
            return jax.random.randint(key, shape, 0, self.size)
        return jax.random.uniform(key, shape + (self.size,), minval=-1.0, maxval=1.0)


def action_coding(env: GoalEnv) -> ActionCoding:
    space = env.action_space
    if isinstance(space, Discrete):
        return ActionCoding(True, space.n)
    if space.low != -1.0 or space.high != 1.0 or len(space.shape) != 1:
        raise ValueError(f"CRL's Gaussian actor needs actions in a [-1, 1] vector box, got {space}")
    return ActionCoding(False, space.shape[0])


def squashed_gaussian_sample(outputs: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(tanh(u), log pi) with u ~ N(mean, std), reparameterised; log-std squashed into [-5, 2]."""
    mean, raw_log_std = jnp.split(outputs, 2, axis=-1)
    log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (jnp.tanh(raw_log_std) + 1)
    noise = jax.random.normal(key, mean.shape)
    pre_tanh = mean + jnp.exp(log_std) * noise
    gaussian_log_prob = jnp.sum(-0.5 * jnp.square(noise) - log_std - 0.5 * math.log(2 * math.pi), axis=-1)
    # log |d tanh(u) / du| = log(1 - tanh(u)^2), in the form that stays finite for large |u|.
    log_det = jnp.sum(2 * (math.log(2) - pre_tanh - jax.nn.softplus(-2 * pre_tanh)), axis=-1)
    return jnp.tanh(pre_tanh), gaussian_log_prob - log_det


# ----------------------------------------------------------------------------------------------
# The trajectory replay buffer and hindsight relabelling


@struct.dataclass
class TrajectoryBuffer:
    """Per environment, a circular time axis of transitions. `episode` is -1 where nothing was
    written yet; episode numbers count up per environment, so equal numbers are one episode."""

    obs: jax.Array  # [L, N, obs_dim]
    actions: jax.Array  # [L, N] int32 or [L, N, action_dim]
    next_goals: jax.Array  # [L, N, goal_dim] achieved goal of the observation after the action
    episode: jax.Array  # [L, N] int32
    insert_at: jax.Array  # next time slot to write
    filled: jax.Array  # time slots written so far, at most L

    @property
    def capacity(self) -> int:
        return self.episode.shape[0]

    def shard(self, mesh: Mesh | None) -> "TrajectoryBuffer":
        """Split over the mesh's devices along the environment axis: each device keeps the whole
        circular time axis of its own environments (the identity without a mesh)."""
        stored = shard_along((self.obs, self.actions, self.next_goals, self.episode), mesh, axis=1)
        return self.replace(**dict(zip(("obs", "actions", "next_goals", "episode"), stored)))


def empty_buffer(steps: int, num_envs: int, env: GoalEnv, coding: ActionCoding) -> TrajectoryBuffer:
    obs_space, goal_space = env.observation_space, env.goal_space
    action_shape = () if coding.discrete else (coding.size,)
    return TrajectoryBuffer(
        obs=jnp.zeros((steps, num_envs) + obs_space.shape, obs_space.dtype),
        actions=jnp.zeros((steps, num_envs) + action_shape, jnp.int32 if coding.discrete else jnp.float32),
        next_goals=jnp.zeros((steps, num_envs) + goal_space.shape, goal_space.dtype),
        episode=jnp.full((steps, num_envs), -1, jnp.int32),
        insert_at=jnp.int32(0),
        filled=jnp.int32(0),
    )


def write_unroll(buffer: TrajectoryBuffer, unroll: "Unroll") -> TrajectoryBuffer:
    """Write an unroll [U, N, ...] at the insert slot; U divides L, so it never wraps inside."""
    def put(stored, new):
        return jax.lax.dynamic_update_slice_in_dim(stored, new.astype(stored.dtype), buffer.insert_at, axis=0)

    length = unroll.episode.shape[0]
    return buffer.replace(
        obs=put(buffer.obs, unroll.obs),
        actions=put(buffer.actions, unroll.actions),
        next_goals=put(buffer.next_goals, unroll.next_goals),
        episode=put(buffer.episode, unroll.episode),
        insert_at=(buffer.insert_at + length) % buffer.capacity,
        filled=jnp.minimum(buffer.filled + length, buffer.capacity),
    )


class Transitions(NamedTuple):
    obs: jax.Array  # [B, obs_dim]
    actions: jax.Array  # [B] or [B, action_dim]
    goals: jax.Array  # [B, goal_dim] hindsight goals
    offsets: jax.Array  # [B] k: the goal is the achieved goal k steps later
    steps_left: jax.Array  # [B] K: the most k could be in this episode


def truncated_geometric(key: jax.Array, discount: float, steps_left: jax.Array) -> jax.Array:
    """k in 1..K with P(k) proportional to discount^k, by inverting the CDF
    F(k) = (1 - discount^k) / (1 - discount^K)."""
    uniform = jax.random.uniform(key, steps_left.shape)
    mass = 1.0 - jnp.power(discount, steps_left.astype(jnp.float32))
    k = jnp.floor(jnp.log1p(-uniform * mass) / math.log(discount)) + 1
    return jnp.clip(k.astype(jnp.int32), 1, steps_left)


def sample_transitions(buffer: TrajectoryBuffer, key: jax.Array, batch_size: int, discount: float,
                       max_episode_steps: int) -> Transitions:
    """A batch of stored transitions, each with a hindsight goal from later in its own episode."""
    env_key, time_key, offset_key = jax.random.split(key, 3)
    num_envs = buffer.episode.shape[1]
    env = jax.random.randint(env_key, (batch_size,), 0, num_envs)
    t = jax.random.randint(time_key, (batch_size,), 0, buffer.filled)  # slots fill from 0 before wrapping
    # Steps of the same episode from t on (t included): episodes are contiguous and no longer than
    # the horizon, so look ahead one horizon, past the wrap, and count the leading run of matches.
    ahead = (t[:, None] + jnp.arange(max_episode_steps)[None, :]) % buffer.capacity
    same = buffer.episode[ahead, env[:, None]] == buffer.episode[t, env][:, None]
    steps_left = jnp.sum(jnp.cumprod(same, axis=1), axis=1)
    offsets = truncated_geometric(offset_key, discount, steps_left)
    goal_slot = (t + offsets - 1) % buffer.capacity  # next_goals[t'] is the goal of the state at t' + 1
    return Transitions(buffer.obs[t, env], buffer.actions[t, env], buffer.next_goals[goal_slot, env],
                       offsets, steps_left)


# ----------------------------------------------------------------------------------------------
# Collecting experience


class Unroll(NamedTuple):
    obs: jax.Array
    actions: jax.Array
    next_goals: jax.Array
    episode: jax.Array
    ended: jax.Array  # [U, N] bool: the step ended an episode
    success: jax.Array  # [U, N] bool


@struct.dataclass
class Collector:
    """The parallel environments between unrolls."""

    env_state: Any
    obs: jax.Array  # [N, obs_dim]
    episode: jax.Array  # [N] episode number of each environment's current episode


def make_unroll(env: GoalEnv, env_params: Any, coding: ActionCoding, num_envs: int, length: int,
                mesh: Mesh | None = None):
    """`unroll(collector, choose_actions, key) -> (collector, Unroll)`: `length` steps of every
    environment in `lax.scan`, with `choose_actions(obs, goals, key) -> actions`. With a `mesh`,
    the environments are split over its devices."""
    batched = VmapAutoReset(env, num_envs)
    desired_goals = jax.vmap(env.desired_goal, (0, None))

    def unroll(collector: Collector, choose_actions: Callable, key: jax.Array):
        def step(collector: Collector, step_key):
            action_key, env_key = jax.random.split(step_key)
            actions = choose_actions(collector.obs, desired_goals(collector.env_state, env_params), action_key)
            obs, env_state, _, terminated, truncated, info = batched.step(
                shard_batch(jax.random.split(env_key, num_envs), mesh), collector.env_state, actions, env_params)
            ended = terminated | truncated
            record = Unroll(collector.obs, actions, env.achieved_goal(info["final_observation"]), collector.episode,
                            ended, info["success"] & ended)
            return shard_batch(Collector(env_state, obs, collector.episode + ended.astype(jnp.int32)), mesh), record

        collector, steps = jax.lax.scan(step, shard_batch(collector, mesh), jax.random.split(key, length))
        return collector, shard_along(steps, mesh, axis=1)

    return unroll


def reset_collector(env: GoalEnv, env_params: Any, num_envs: int, key: jax.Array) -> Collector:
    obs, env_state = VmapAutoReset(env, num_envs).reset(jax.random.split(key, num_envs), env_params)
    return Collector(env_state, obs, jnp.zeros(num_envs, jnp.int32))


# ----------------------------------------------------------------------------------------------
# The learner: networks, optimisers, temperature


@struct.dataclass
class Learner:
    critic_params: nnx.State
    actor_params: nnx.State
    log_alpha: jax.Array
    critic_opt_state: optax.OptState
    actor_opt_state: optax.OptState
    alpha_opt_state: optax.OptState
    critic_graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    actor_graphdef: nnx.GraphDef = struct.field(pytree_node=False)

    def critic(self) -> Critic:
        return nnx.merge(self.critic_graphdef, self.critic_params)

    def actor(self) -> Actor:
        return nnx.merge(self.actor_graphdef, self.actor_params)


class Optimizers(NamedTuple):
    critic: optax.GradientTransformation
    actor: optax.GradientTransformation
    alpha: optax.GradientTransformation


def make_optimizers(cfg: CRLConfig) -> Optimizers:
    return Optimizers(optax.adam(cfg.critic_learning_rate), optax.adam(cfg.actor_learning_rate),
                      optax.adam(cfg.alpha_learning_rate))


def init_learner(key: jax.Array, cfg: CRLConfig, env: GoalEnv) -> Learner:
    coding = action_coding(env)
    obs_dim, goal_dim = env.observation_space.shape[0], env.goal_space.shape[0]
    critic_key, actor_key = jax.random.split(key)
    critic = Critic(obs_dim, coding.critic_input, goal_dim, cfg, nnx.Rngs(params=critic_key))
    actor = Actor(obs_dim, goal_dim, coding.policy_outputs, cfg, nnx.Rngs(params=actor_key))
    critic_graphdef, critic_params = nnx.split(critic)
    actor_graphdef, actor_params = nnx.split(actor)
    log_alpha = jnp.float32(0.0)
    optimizers = make_optimizers(cfg)
    return Learner(critic_params, actor_params, log_alpha, optimizers.critic.init(critic_params),
                   optimizers.actor.init(actor_params), optimizers.alpha.init(log_alpha),
                   critic_graphdef, actor_graphdef)


def critic_loss(critic_params, graphdef, batch: Transitions, coding: ActionCoding, cfg: CRLConfig):
    critic: Critic = nnx.merge(graphdef, critic_params)
    sa_input = jnp.concatenate([batch.obs.astype(jnp.float32), coding.encode(batch.actions)], axis=-1)
    sa_repr = critic.sa_encoder(sa_input)  # [B, D]
    goal_repr = critic.goal_encoder(batch.goals)  # [B, D]
    logits = energy(sa_repr[:, None, :], goal_repr[None, :, :], cfg.energy_epsilon)  # [B, B]
    return infonce_loss(logits, cfg.logsumexp_penalty)


def energies_of_all_actions(critic: Critic, obs: jax.Array, goals: jax.Array, coding: ActionCoding,
                            epsilon: float) -> jax.Array:
    """f(s, a, g) for every discrete action a: [B, A]."""
    batch = obs.shape[0]
    every_action = jnp.broadcast_to(jnp.eye(coding.size), (batch, coding.size, coding.size))
    states = jnp.broadcast_to(obs.astype(jnp.float32)[:, None, :], (batch, coding.size, obs.shape[-1]))
    sa_repr = critic.sa_encoder(jnp.concatenate([states, every_action], axis=-1))  # [B, A, D]
    return energy(sa_repr, critic.goal_encoder(goals)[:, None, :], epsilon)


def actor_loss(actor_params, graphdef, critic: Critic, alpha: jax.Array, batch: Transitions, key: jax.Array,
               coding: ActionCoding, cfg: CRLConfig):
    """E_{a ~ pi}[alpha log pi - f]; returns (loss, entropy estimate per sample [B])."""
    outputs = nnx.merge(graphdef, actor_params)(batch.obs, batch.goals)
    if coding.discrete:
        # Exact expectation over the actions; f does not depend on the actor, so no gradient flows
        # into the critic.
        log_pi = jax.nn.log_softmax(outputs)
        pi = jnp.exp(log_pi)
        f = jax.lax.stop_gradient(energies_of_all_actions(critic, batch.obs, batch.goals, coding, cfg.energy_epsilon))
        entropy = -jnp.sum(pi * log_pi, axis=-1)
        return jnp.mean(jnp.sum(pi * (alpha * log_pi - f), axis=-1)), entropy
    actions, log_pi = squashed_gaussian_sample(outputs, key)
    # Gradients flow through f into the sampled actions; the critic's parameters are not arguments here.
    sa_repr = critic.sa_encoder(jnp.concatenate([batch.obs.astype(jnp.float32), actions], axis=-1))
    f = energy(sa_repr, critic.goal_encoder(batch.goals), cfg.energy_epsilon)
    return jnp.mean(alpha * log_pi - f), -log_pi


def make_update(cfg: CRLConfig, env: GoalEnv) -> Callable[[Learner, Transitions, jax.Array], tuple[Learner, dict]]:
    """`update(learner, batch, key) -> (learner, metrics)`: one gradient step of the critic, then of
    the actor (against the updated critic), then of the temperature. Pure: jit and vmap it."""
    coding = action_coding(env)
    optimizers = make_optimizers(cfg)
    target_entropy = coding.target_entropy(cfg)

    def update(learner: Learner, batch: Transitions, key: jax.Array):
        (_, critic_metrics), grads = jax.value_and_grad(critic_loss, has_aux=True)(
            learner.critic_params, learner.critic_graphdef, batch, coding, cfg)
        updates, critic_opt_state = optimizers.critic.update(grads, learner.critic_opt_state, learner.critic_params)
        critic_params = optax.apply_updates(learner.critic_params, updates)

        critic = nnx.merge(learner.critic_graphdef, critic_params)
        alpha = jnp.exp(learner.log_alpha)
        (actor_value, entropy), grads = jax.value_and_grad(actor_loss, has_aux=True)(
            learner.actor_params, learner.actor_graphdef, critic, alpha, batch, key, coding, cfg)
        updates, actor_opt_state = optimizers.actor.update(grads, learner.actor_opt_state, learner.actor_params)
        actor_params = optax.apply_updates(learner.actor_params, updates)

        # SAC's temperature loss: log alpha falls while the entropy is above the target.
        entropy_gap = jax.lax.stop_gradient(jnp.mean(entropy) - target_entropy)
        alpha_grad = jax.grad(lambda log_alpha: log_alpha * entropy_gap)(learner.log_alpha)
        updates, alpha_opt_state = optimizers.alpha.update(alpha_grad, learner.alpha_opt_state, learner.log_alpha)
        log_alpha = optax.apply_updates(learner.log_alpha, updates)

        learner = learner.replace(critic_params=critic_params, actor_params=actor_params, log_alpha=log_alpha,
                                  critic_opt_state=critic_opt_state, actor_opt_state=actor_opt_state,
                                  alpha_opt_state=alpha_opt_state)
        metrics = {**critic_metrics, "actor/loss": actor_value, "actor/entropy": jnp.mean(entropy),
                   "actor/alpha": alpha, "relabel/mean_offset": jnp.mean(batch.offsets.astype(jnp.float32))}
        return learner, metrics

    return update


# ----------------------------------------------------------------------------------------------
# The training state and the jitted chunk


@struct.dataclass
class CRLState:
    learner: Learner
    collector: Collector
    buffer: TrajectoryBuffer
    key: jax.Array  # all randomness after init, so a resumed run repeats the same draws
    env_steps: jax.Array  # summed over environments
    episodes: jax.Array  # ended during training (not the prefill)
    updates: jax.Array


def acting_policy(learner: Learner, coding: ActionCoding, greedy: bool = False) -> Callable:
    actor = learner.actor()

    def choose(obs, goals, key):
        outputs = actor(obs, goals)
        return coding.greedy(outputs) if greedy else coding.sample(outputs, key)

    return choose


def init(key: jax.Array, cfg: CRLConfig, env: GoalEnv, env_params: Any) -> CRLState:
    """Networks, optimisers, the environments and a buffer holding `prefill_steps` random steps."""
    check_env_fits(cfg, env)
    coding = action_coding(env)
    learner_key, reset_key, prefill_key, train_key = jax.random.split(key, 4)
    prefill = make_unroll(env, env_params, coding, cfg.num_envs, cfg.unroll_length)

    def random_actions(obs, goals, action_key):
        return coding.random(action_key, (obs.shape[0],))

    @jax.jit
    def collect_random(collector, buffer, prefill_key):
        def one(carry, unroll_key):
            collector, buffer = carry
            collector, unroll = prefill(collector, random_actions, unroll_key)
            return (collector, write_unroll(buffer, unroll)), None

        num_unrolls = cfg.prefill_steps // cfg.unroll_length
        (collector, buffer), _ = jax.lax.scan(one, (collector, buffer), jax.random.split(prefill_key, num_unrolls))
        return collector, buffer

    collector = reset_collector(env, env_params, cfg.num_envs, reset_key)
    buffer = empty_buffer(cfg.buffer_steps, cfg.num_envs, env, coding)
    if cfg.prefill_steps > 0:  # else the first iteration's unroll fills the buffer before any update
        collector, buffer = collect_random(collector, buffer, prefill_key)
    # Training episodes are counted from the prefill's end; numbering goes on (only equality matters).
    return CRLState(init_learner(learner_key, cfg, env), collector, buffer, train_key,
                    env_steps=jnp.int32(0), episodes=jnp.int32(0), updates=jnp.int32(0))


def make_train_chunk(cfg: CRLConfig, env: GoalEnv, env_params: Any, mesh: Mesh | None = None
                     ) -> Callable[[CRLState], tuple[CRLState, dict]]:
    """A jitted `train_chunk(state) -> (state, metrics)`: `cfg.iterations_per_chunk` iterations of
    (unroll every environment, write to the buffer, `updates_per_iteration` updates). With a
    `mesh`, the environments, the buffer (along its environment axis) and each sampled batch are
    split over its devices; the networks are on every device."""
    coding = action_coding(env)
    unroll = make_unroll(env, env_params, coding, cfg.num_envs, cfg.unroll_length, mesh)
    update = make_update(cfg, env)

    def gradient_step(carry, step_key):
        learner, buffer = carry
        sample_key, update_key = jax.random.split(step_key)
        # Drawn over all environments, as on one device: XLA gathers each row from the device
        # holding its environment, so the batch is the single-device batch.
        batch = shard_batch(sample_transitions(buffer.shard(mesh), sample_key, cfg.batch_size, cfg.discount,
                                               env.max_steps), mesh)
        learner, metrics = update(learner, batch, update_key)
        return (learner, buffer), metrics

    def iteration(state: CRLState, _):
        key, unroll_key, updates_key = jax.random.split(state.key, 3)
        collector, steps = unroll(state.collector, acting_policy(state.learner, coding), unroll_key)
        buffer = write_unroll(state.buffer.shard(mesh), steps).shard(mesh)
        (learner, buffer), metrics = jax.lax.scan(
            gradient_step, (state.learner, buffer), jax.random.split(updates_key, cfg.updates_per_iteration))
        ended = jnp.sum(steps.ended)
        state = state.replace(learner=learner, collector=collector, buffer=buffer, key=key,
                              env_steps=state.env_steps + steps.ended.size, episodes=state.episodes + ended,
                              updates=state.updates + cfg.updates_per_iteration)
        episode_stats = {"collect/episodes_ended": ended, "collect/successes": jnp.sum(steps.success)}
        return state, ({name: jnp.mean(value) for name, value in metrics.items()}, episode_stats)

    @jax.jit
    def train_chunk(state: CRLState):
        state, (metrics, episode_stats) = jax.lax.scan(iteration, state, length=cfg.iterations_per_chunk)
        ended = jnp.sum(episode_stats["collect/episodes_ended"])
        return state, {
            **{name: jnp.mean(value) for name, value in metrics.items()},
            # Among the training episodes that ended in this chunk (0 when none did).
            "collect/success_rate": jnp.sum(episode_stats["collect/successes"]) / jnp.maximum(ended, 1),
            "episodes": state.episodes,
            "env_steps": state.env_steps,
        }

    return train_chunk


def make_evaluate(cfg: CRLConfig, env: GoalEnv, env_params: Any, key: jax.Array) -> Callable[[CRLState], dict]:
    """A jitted `evaluate(state)`: `eval_episodes` episodes on layouts fixed by `key`, commanded the
    environment's goal, once with actions sampled from the policy and once greedy (argmax; tanh of
    the mean), on the same layouts. Returns per mode the success rate, the mean progress (colours
    correctly visited on pinpad; 1 for a reached goal cell) and the mean episode length."""
    coding = action_coding(env)
    episode_keys = jax.random.split(key, cfg.eval_episodes)

    def run_episode(choose, episode_key):
        reset_key, step_key = jax.random.split(episode_key)
        obs, env_state = env.reset(reset_key, env_params)
        goal = env.desired_goal(env_state, env_params)

        def step(carry, step_key):
            obs, env_state, done, success, progress, length = carry
            action_key, env_key = jax.random.split(step_key)
            action = choose(obs[None], goal[None], action_key)[0]
            obs, env_state, _, terminated, truncated, info = env.step(env_key, env_state, action, env_params)
            # Results freeze when the episode ends; the steps after it are discarded.
            success = success | (info["success"] & ~done)
            progress = jnp.where(done, progress, info["progress"])
            length = length + (~done).astype(jnp.int32)
            return (obs, env_state, done | terminated | truncated, success, progress, length), None

        start = (obs, env_state, jnp.bool_(False), jnp.bool_(False), jnp.int32(0), jnp.int32(0))
        (_, _, _, success, progress, length), _ = jax.lax.scan(step, start, jax.random.split(step_key, env.max_steps))
        return {"success_rate": success, "progress": progress, "episode_length": length}

    @jax.jit
    def evaluate(state: CRLState):
        metrics = {}
        for prefix, greedy in (("", False), ("greedy_", True)):
            choose = acting_policy(state.learner, coding, greedy=greedy)
            results = jax.vmap(lambda k: run_episode(choose, k))(episode_keys)
            metrics.update({prefix + name: jnp.mean(value) for name, value in results.items()})
        return metrics

    return evaluate
