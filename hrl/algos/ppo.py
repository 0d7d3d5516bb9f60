"""Proximal policy optimisation (PPO; Schulman et al. 2017) for continuous actions: the flat
expert of ant-pinpad (spec: one PPO policy for all tasks, trained on a privileged observation and
a dense reward, `envs.make("AntPinpadExpert-v0")`). Environment-agnostic: any `Env` with a
[-1, 1] Box action space; the reward is the environment's.

One iteration, all on the device (`train_chunk` runs `iterations_per_chunk` of them in
`lax.scan`; nothing goes to the host inside):
1. Unroll: `num_envs` environments (vmapped, same-step auto-reset `envs.wrappers.VmapAutoReset`)
   take `unroll_length` steps with actions sampled from the current policy. Observations are
   normalised with the running statistics as they were when the step was taken, and stored
   normalised, so the update sees exactly what the behaviour policy saw (the ratio starts at 1).
2. Advantages by GAE(gamma, lambda) (`gae`). Bootstrapping follows the env's split: a terminated
   step has no future (next value 0); a truncated step bootstraps from the value of its final
   observation (`info["final_observation"]`); the GAE trace is cut at every episode end.
3. `update_epochs` passes over the batch in `num_minibatches` shuffled minibatches: clipped
   surrogate, value loss, entropy bonus, one Adam step each (global-norm clipped). Advantages are
   normalised per minibatch.
4. The running observation statistics (count, mean, sum of squares; Chan et al.'s parallel
   update) absorb the unroll's raw observations, for the next unroll.

Choices (DECIDE, documented):
- Policy: a Gaussian with a state-independent learned log-std (CleanRL's continuous PPO), no
  tanh. The sampled action is clipped into [-1, 1] before it reaches the environment and the
  log-probability is that of the unclipped sample (so log-probs are exact and cheap); the
  entropy bonus is the Gaussian's. A tanh squash would need the Jacobian correction and makes
  the entropy intractable; with clipping, actions beyond the box act as the box's edge.
- Value loss: 0.5 x squared error against the GAE returns, unclipped (clipping the value
  function does not help, Andrychowicz et al. 2021).
- Networks: separate actor and critic MLPs (`hidden` widths, swish), the actor's last layer
  initialised small (scale 0.01) so the first policy is the N(0, exp(init_log_std)) noise.
- Observations are normalised, rewards are not (they are multiplied by `reward_scale`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from envs.base import Box, Env
from envs.wrappers import VmapAutoReset
from hrl.infra.config import check
from hrl.infra.mesh import Mesh, shard_along, shard_batch


@dataclasses.dataclass
class PPOConfig:
    """Defaults close to Brax's ant PPO scaled to a CPU: 256 envs x 32 steps per iteration."""

    num_envs: int = 256
    unroll_length: int = 32
    num_minibatches: int = 8
    update_epochs: int = 4
    num_iterations: int = 2000
    iterations_per_chunk: int = 10
    learning_rate: float = 3e-4
    max_grad_norm: float = 0.5
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_epsilon: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 1e-3
    reward_scale: float = 1.0
    init_log_std: float = -0.5
    hidden: tuple[int, ...] = (256, 256)
    normalize_observations: bool = True
    eval_episodes: int = 64

    def validate(self) -> None:
        for name in ("num_envs", "unroll_length", "num_minibatches", "update_epochs", "num_iterations",
                     "iterations_per_chunk", "learning_rate", "max_grad_norm", "eval_episodes"):
            check(getattr(self, name) > 0, name, "must be > 0", getattr(self, name))
        check((self.num_envs * self.unroll_length) % self.num_minibatches == 0, "num_minibatches",
              f"must divide num_envs x unroll_length ({self.num_envs * self.unroll_length})", self.num_minibatches)
        check(self.num_iterations % self.iterations_per_chunk == 0, "num_iterations",
              f"must be a multiple of iterations_per_chunk ({self.iterations_per_chunk})", self.num_iterations)
        check(0 < self.gamma <= 1 and 0 <= self.gae_lambda <= 1, "gamma", "gamma in (0, 1], lambda in [0, 1]",
              (self.gamma, self.gae_lambda))
        check(len(self.hidden) >= 1 and min(self.hidden) > 0, "hidden", "must be positive widths", self.hidden)

    @property
    def num_chunks(self) -> int:
        return self.num_iterations // self.iterations_per_chunk

    @property
    def env_steps_per_iteration(self) -> int:
        return self.num_envs * self.unroll_length


# ----------------------------------------------------------------------------------------------
# Networks and the Gaussian policy


class MLP(nnx.Module):
    def __init__(self, in_features: int, hidden: tuple[int, ...], out_features: int, rngs: nnx.Rngs,
                 last_scale: float = 1.0):
        sizes = (in_features, *hidden)
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        init = nnx.initializers.variance_scaling(last_scale, "fan_avg", "uniform")
        self.head = nnx.Linear(sizes[-1], out_features, kernel_init=init, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = jax.nn.swish(layer(x))
        return self.head(x)


class ActorCritic(nnx.Module):
    """obs -> (action mean, log-std, value)."""

    def __init__(self, obs_dim: int, action_dim: int, cfg: PPOConfig, rngs: nnx.Rngs):
        self.actor = MLP(obs_dim, cfg.hidden, action_dim, rngs, last_scale=0.01)
        self.critic = MLP(obs_dim, cfg.hidden, 1, rngs)
        self.log_std = nnx.Param(jnp.full((action_dim,), cfg.init_log_std, jnp.float32))

    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        return self.actor(obs), self.log_std[...], self.critic(obs)[..., 0]


def gaussian_log_prob(action: jax.Array, mean: jax.Array, log_std: jax.Array) -> jax.Array:
    z = (action - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * jnp.square(z) - log_std - 0.5 * math.log(2 * math.pi), axis=-1)


def gaussian_entropy(log_std: jax.Array) -> jax.Array:
    return jnp.sum(log_std + 0.5 * math.log(2 * math.pi * math.e), axis=-1)


# ----------------------------------------------------------------------------------------------
# Running observation statistics


@struct.dataclass
class ObsStats:
    count: jax.Array  # float32 scalar
    mean: jax.Array  # [obs_dim]
    m2: jax.Array  # [obs_dim] sum of squared deviations


def init_obs_stats(obs_dim: int) -> ObsStats:
    return ObsStats(jnp.float32(0), jnp.zeros(obs_dim, jnp.float32), jnp.zeros(obs_dim, jnp.float32))


def update_obs_stats(stats: ObsStats, batch: jax.Array) -> ObsStats:
    """Merges a batch [N, obs_dim] into the statistics (Chan et al.'s parallel variance update)."""
    batch = batch.reshape(-1, batch.shape[-1]).astype(jnp.float32)
    n = jnp.float32(batch.shape[0])
    batch_mean = jnp.mean(batch, axis=0)
    batch_m2 = jnp.sum(jnp.square(batch - batch_mean), axis=0)
    total = stats.count + n
    delta = batch_mean - stats.mean
    mean = stats.mean + delta * n / total
    m2 = stats.m2 + batch_m2 + jnp.square(delta) * stats.count * n / total
    return ObsStats(total, mean, m2)


def normalize(stats: ObsStats, obs: jax.Array, enabled: bool = True) -> jax.Array:
    """(obs - mean) / std, clipped to +-10; the identity before any data or when disabled."""
    if not enabled:
        return obs.astype(jnp.float32)
    variance = jnp.where(stats.count > 1, stats.m2 / jnp.maximum(stats.count - 1, 1), 1.0)
    return jnp.clip((obs - stats.mean) / jnp.sqrt(variance + 1e-8), -10.0, 10.0)


# ----------------------------------------------------------------------------------------------
# GAE


def gae(rewards: jax.Array, values: jax.Array, next_values: jax.Array, terminated: jax.Array,
        truncated: jax.Array, gamma: float, lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over a [T, ...] unroll whose episodes may end anywhere.

    `next_values[t]` is the value of the observation that step t produced (the final observation
    of the old episode when it ended). delta_t = r_t + gamma (1 - terminated_t) next_values_t -
    values_t; A_t = delta_t + gamma lambda (1 - done_t) A_{t+1}, done = terminated or truncated,
    and A after the last step is 0. Returns (advantages, returns = advantages + values).
    """
    deltas = rewards + gamma * (1.0 - terminated) * next_values - values
    continues = gamma * lam * (1.0 - jnp.maximum(terminated, truncated))

    def backward(next_advantage, inputs):
        delta, keep = inputs
        advantage = delta + keep * next_advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(backward, jnp.zeros_like(deltas[0]), (deltas, continues), reverse=True)
    return advantages, advantages + values


# ----------------------------------------------------------------------------------------------
# The loss and one update


class Batch(NamedTuple):
    obs: jax.Array  # normalised, as the behaviour policy saw them
    actions: jax.Array  # unclipped samples
    log_probs: jax.Array
    advantages: jax.Array
    returns: jax.Array


def ppo_loss(params, graphdef, batch: Batch, cfg: PPOConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    mean, log_std, value = nnx.merge(graphdef, params)(batch.obs)
    log_probs = gaussian_log_prob(batch.actions, mean, log_std)
    ratio = jnp.exp(log_probs - batch.log_probs)
    advantages = (batch.advantages - jnp.mean(batch.advantages)) / (jnp.std(batch.advantages) + 1e-8)
    clipped = jnp.clip(ratio, 1 - cfg.clip_epsilon, 1 + cfg.clip_epsilon)
    policy_loss = -jnp.mean(jnp.minimum(ratio * advantages, clipped * advantages))
    value_loss = 0.5 * jnp.mean(jnp.square(value - batch.returns))
    entropy = jnp.mean(gaussian_entropy(log_std))
    loss = policy_loss + cfg.value_coef * value_loss - cfg.entropy_coef * entropy
    return loss, {
        "loss/total": loss, "loss/policy": policy_loss, "loss/value": value_loss, "policy/entropy": entropy,
        "policy/approx_kl": jnp.mean((ratio - 1) - jnp.log(ratio)),
        "policy/clip_fraction": jnp.mean(jnp.abs(ratio - 1) > cfg.clip_epsilon),
    }


def make_optimizer(cfg: PPOConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(cfg.learning_rate, eps=1e-5))


def make_update(cfg: PPOConfig, graphdef, mesh: Mesh | None = None) -> Callable:
    """`update(params, opt_state, batch [N, ...], key) -> (params, opt_state, metrics)`: the epochs
    of minibatch steps of PPO on one flat batch. With a `mesh`, each minibatch is split over its
    devices."""
    optimizer = make_optimizer(cfg)
    grad_fn = jax.grad(ppo_loss, has_aux=True)

    def minibatch_step(carry, minibatch):
        params, opt_state = carry
        grads, metrics = grad_fn(params, graphdef, shard_batch(minibatch, mesh), cfg)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), metrics

    def epoch(carry, key):
        params, opt_state, batch = carry
        size = batch.obs.shape[0]
        order = jax.random.permutation(key, size)
        minibatches = shard_along(jax.tree.map(
            lambda x: x[order].reshape((cfg.num_minibatches, size // cfg.num_minibatches) + x.shape[1:]), batch),
            mesh, axis=1)
        (params, opt_state), metrics = jax.lax.scan(minibatch_step, (params, opt_state), minibatches)
        return (params, opt_state, batch), metrics

    def update(params, opt_state, batch: Batch, key):
        (params, opt_state, _), metrics = jax.lax.scan(
            epoch, (params, opt_state, batch), jax.random.split(key, cfg.update_epochs))
        return params, opt_state, jax.tree.map(jnp.mean, metrics)

    return update


# ----------------------------------------------------------------------------------------------
# The training state, the unroll and train_chunk


@struct.dataclass
class PPOState:
    params: nnx.State
    opt_state: optax.OptState
    obs_stats: ObsStats
    env_states: Any
    obs: jax.Array  # [num_envs, obs_dim] raw observations the next step acts on
    key: jax.Array  # all randomness after init, so a resumed run repeats the same draws
    env_steps: jax.Array
    iterations: jax.Array
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)


def check_env_fits(env: Env) -> None:
    space = env.action_space
    check(isinstance(space, Box) and space.low == -1.0 and space.high == 1.0 and len(space.shape) == 1,
          "env.name", "PPO needs actions in a [-1, 1] vector box", env.name)


def init(key: jax.Array, cfg: PPOConfig, env: Env, env_params: Any) -> PPOState:
    check_env_fits(env)
    net_key, reset_key, train_key = jax.random.split(key, 3)
    obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    graphdef, params = nnx.split(ActorCritic(obs_dim, action_dim, cfg, nnx.Rngs(params=net_key)))
    batched = VmapAutoReset(env, cfg.num_envs)
    obs, env_states = jax.jit(batched.reset)(jax.random.split(reset_key, cfg.num_envs), env_params)
    return PPOState(params=params, opt_state=make_optimizer(cfg).init(params), obs_stats=init_obs_stats(obs_dim),
                    env_states=env_states, obs=obs, key=train_key, env_steps=jnp.int32(0), iterations=jnp.int32(0),
                    graphdef=graphdef)


class Unroll(NamedTuple):
    obs: jax.Array  # [T, N, obs_dim] normalised
    raw_obs: jax.Array  # [T, N, obs_dim]
    actions: jax.Array
    log_probs: jax.Array
    values: jax.Array
    rewards: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    final_obs: jax.Array  # [T, N, obs_dim] normalised observation each step produced
    success: jax.Array


def make_unroll(cfg: PPOConfig, env: Env, env_params: Any, mesh: Mesh | None = None) -> Callable:
    """`unroll(state, key) -> (env states, observations, Unroll [T, N, ...])`: `unroll_length`
    steps of every environment. With a `mesh`, the environments are split over its devices."""
    batched = VmapAutoReset(env, cfg.num_envs)

    def unroll(state: PPOState, key):
        network = nnx.merge(state.graphdef, state.params)

        def step(carry, step_key):
            env_states, obs = carry
            action_key, env_key = jax.random.split(step_key)
            norm_obs = normalize(state.obs_stats, obs, cfg.normalize_observations)
            mean, log_std, value = network(norm_obs)
            action = mean + jnp.exp(log_std) * jax.random.normal(action_key, mean.shape)
            next_obs, env_states, reward, terminated, truncated, info = batched.step(
                shard_batch(jax.random.split(env_key, cfg.num_envs), mesh), env_states, jnp.clip(action, -1.0, 1.0),
                env_params)
            record = Unroll(norm_obs, obs, action, gaussian_log_prob(action, mean, log_std), value,
                            reward * cfg.reward_scale, terminated.astype(jnp.float32), truncated.astype(jnp.float32),
                            normalize(state.obs_stats, info["final_observation"], cfg.normalize_observations),
                            info["success"])
            return shard_batch((env_states, next_obs), mesh), record

        (env_states, obs), steps = jax.lax.scan(step, shard_batch((state.env_states, state.obs), mesh),
                                                jax.random.split(key, cfg.unroll_length))
        return env_states, obs, shard_along(steps, mesh, axis=1)

    return unroll


def make_train_chunk(cfg: PPOConfig, env: Env, env_params: Any, graphdef, mesh: Mesh | None = None
                     ) -> Callable[[PPOState], tuple[PPOState, dict]]:
    """A jitted `train_chunk(state) -> (state, metrics)` of `cfg.iterations_per_chunk` iterations.
    With a `mesh`, the environments of the unroll and each minibatch are split over its devices;
    the networks and the observation statistics are on every device."""
    unroll = make_unroll(cfg, env, env_params, mesh)
    update = make_update(cfg, graphdef, mesh)

    def iteration(state: PPOState, _):
        key, unroll_key, update_key = jax.random.split(state.key, 3)
        env_states, obs, steps = unroll(state, unroll_key)
        network = nnx.merge(state.graphdef, state.params)
        next_values = network(steps.final_obs)[2]
        advantages, returns = gae(steps.rewards, steps.values, next_values, steps.terminated, steps.truncated,
                                  cfg.gamma, cfg.gae_lambda)
        flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]),
                            Batch(steps.obs, steps.actions, steps.log_probs, advantages, returns))
        params, opt_state, metrics = update(state.params, state.opt_state, flat, update_key)
        stats = update_obs_stats(state.obs_stats, steps.raw_obs) if cfg.normalize_observations else state.obs_stats
        ends = jnp.maximum(steps.terminated, steps.truncated)
        ended = jnp.sum(ends)
        state = state.replace(params=params, opt_state=opt_state, obs_stats=stats, env_states=env_states, obs=obs,
                              key=key, env_steps=state.env_steps + cfg.env_steps_per_iteration,
                              iterations=state.iterations + 1)
        successes = jnp.sum(steps.success * ends)  # success at the step that ended an episode
        return state, (metrics, {"ended": ended, "successes": successes, "reward": jnp.mean(steps.rewards)})

    @jax.jit
    def train_chunk(state: PPOState):
        state, (metrics, collected) = jax.lax.scan(iteration, state, length=cfg.iterations_per_chunk)
        ended = jnp.sum(collected["ended"])
        return state, {
            **{name: jnp.mean(value) for name, value in metrics.items()},
            "collect/reward_per_step": jnp.mean(collected["reward"]),
            "collect/episodes_ended": ended,
            "collect/success_rate": jnp.sum(collected["successes"]) / jnp.maximum(ended, 1),
            "env_steps": state.env_steps,
        }

    return train_chunk


def greedy_policy(state: PPOState, normalize_observations: bool = True) -> Callable[[jax.Array], jax.Array]:
    """raw observation [..., obs_dim] -> the clipped Gaussian mean (the "cleaner" expert of D*)."""
    network = nnx.merge(state.graphdef, state.params)
    return lambda obs: jnp.clip(network(normalize(state.obs_stats, obs, normalize_observations))[0], -1.0, 1.0)


def make_evaluate(cfg: PPOConfig, env: Env, env_params: Any, key: jax.Array) -> Callable[[PPOState], dict]:
    """Success rate and mean return of `eval_episodes` full episodes of the greedy policy, on
    layouts fixed by `key` (the same every evaluation)."""
    keys = jax.random.split(key, cfg.eval_episodes)

    @jax.jit
    def evaluate(state: PPOState):
        policy = greedy_policy(state, cfg.normalize_observations)

        def episode(episode_key):
            obs, env_state = env.reset(episode_key, env_params)

            def step(carry, step_key):
                obs, env_state, done, success, total = carry
                obs, new_state, reward, terminated, truncated, info = env.step(step_key, env_state, policy(obs), env_params)
                new_state = jax.tree.map(lambda old, new: jnp.where(done, old, new), env_state, new_state)
                success = success | (~done & info["success"])
                total = total + jnp.where(done, 0.0, reward)
                return (obs, new_state, done | terminated | truncated, success, total), None

            start = (obs, env_state, jnp.bool_(False), jnp.bool_(False), jnp.float32(0))
            (_, _, _, success, total), _ = jax.lax.scan(step, start, jax.random.split(episode_key, env.max_steps))
            return success, total

        success, total = jax.vmap(episode)(keys)
        return {"success_rate": jnp.mean(success), "return": jnp.mean(total)}

    return evaluate

