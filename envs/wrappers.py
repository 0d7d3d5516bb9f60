"""Wrappers that keep the pure (key, state, action, params) interface."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from envs.base import Env


class Wrapper(Env):
    def __init__(self, env: Env):
        self.env = env
        self.name = env.name

    def reset(self, key, params):
        return self.env.reset(key, params)

    def step(self, key, state, action, params):
        return self.env.step(key, state, action, params)

    def __getattr__(self, name):  # spaces, params helpers, horizon ... of the wrapped env
        return getattr(self.env, name)

    @property
    def default_params(self):
        return self.env.default_params

    @property
    def observation_space(self):
        return self.env.observation_space

    @property
    def action_space(self):
        return self.env.action_space

    @property
    def max_steps(self):
        return self.env.max_steps

    @property
    def num_subgoals(self):
        return self.env.num_subgoals


def _select(flag, when_true, when_false):
    return jax.tree.map(lambda a, b: jnp.where(flag, a, b), when_true, when_false)


class AutoReset(Wrapper):
    """Resets in the same step an episode ends (terminated or truncated).

    The returned observation and state are then the first ones of the new episode; reward,
    terminated, truncated and info still describe the step that ended the old one, and
    `info["final_observation"]` holds the observation that step produced. (It is present on every
    step so that the output structure is static; it equals the returned observation except when
    the episode ended.)
    """

    def step(self, key, state, action, params):
        key_step, key_reset = jax.random.split(key)
        obs, state, reward, terminated, truncated, info = self.env.step(key_step, state, action, params)
        reset_obs, reset_state = self.env.reset(key_reset, params)
        done = terminated | truncated
        info = {**info, "final_observation": obs}
        return _select(done, reset_obs, obs), _select(done, reset_state, state), reward, terminated, truncated, info


@struct.dataclass
class EpisodeStatsState:
    env_state: object
    episode_return: jax.Array
    episode_length: jax.Array


class EpisodeStats(Wrapper):
    """Adds `info["episode_return"]` and `info["episode_length"]` of the episode so far (including
    this step); wrap it inside AutoReset so the totals of an ended episode are still reported."""

    def reset(self, key, params):
        obs, state = self.env.reset(key, params)
        return obs, EpisodeStatsState(state, jnp.float32(0), jnp.int32(0))

    def step(self, key, state, action, params):
        obs, env_state, reward, terminated, truncated, info = self.env.step(key, state.env_state, action, params)
        state = EpisodeStatsState(env_state, state.episode_return + reward, state.episode_length + 1)
        info = {**info, "episode_return": state.episode_return, "episode_length": state.episode_length}
        return obs, state, reward, terminated, truncated, info


def _reset_keys(keys: jax.Array) -> jax.Array:
    """The reset keys AutoReset derives from per-environment step keys."""
    return jax.vmap(lambda key: jax.random.split(key)[1])(keys)


class VmapAutoReset:
    """`AutoReset` over a batch of environments, computing resets only for the episodes that end.

    `jax.vmap(AutoReset(env).step)` evaluates a full reset for every environment at every step
    (under vmap both sides of the choice are computed); for the grid that reset costs more than a
    step. Here a step resets only the environments whose episode ended, gathered into a buffer of
    `max_resets` slots; in the rare step where more end at once it falls back to resetting the
    whole batch. Observations are rebuilt from the final states with `env.observe` rather than
    scattered, which saves copying the batch of observations. Both paths give every environment
    exactly the result of `AutoReset(env).step` with the same per-environment key (tested).
    """

    def __init__(self, env: Env, num_envs: int, max_resets: int | None = None):
        self.env = env
        self.num_envs = num_envs
        self.max_resets = max(1, num_envs // 8) if max_resets is None else max_resets
        if not 1 <= self.max_resets <= num_envs:
            raise ValueError(f"max_resets must be in 1..{num_envs}, got {self.max_resets}")

    def reset(self, keys: jax.Array, params):
        return jax.vmap(self.env.reset, (0, None))(keys, params)

    def step(self, keys: jax.Array, states, actions: jax.Array, params):
        """keys [num_envs]; returns batched (obs, state, reward, terminated, truncated, info)."""
        step_keys = jax.vmap(lambda key: jax.random.split(key)[0])(keys)
        _, stepped, reward, terminated, truncated, info = jax.vmap(self.env.step, (0, 0, 0, None))(
            step_keys, states, actions, params
        )
        done = terminated | truncated
        states = jax.lax.cond(
            jnp.sum(done) <= self.max_resets,
            lambda: self._reset_some(keys, stepped, done, params),
            lambda: self._reset_all(keys, stepped, done, params),
        )
        observe = jax.vmap(self.env.observe, (0, None))
        info = {**info, "final_observation": observe(stepped, params)}
        return observe(states, params), states, reward, terminated, truncated, info

    def _reset_all(self, keys, states, done, params):
        _, fresh = self.reset(_reset_keys(keys), params)
        return jax.vmap(_select)(done, fresh, states)

    def _reset_some(self, keys, states, done, params):
        # Indices of the ended episodes, padded with an out-of-range index whose writes are dropped.
        index = jnp.nonzero(done, size=self.max_resets, fill_value=self.num_envs)[0]
        _, fresh = self.reset(_reset_keys(keys[jnp.minimum(index, self.num_envs - 1)]), params)
        return jax.tree.map(lambda batch, new: batch.at[index].set(new, mode="drop"), states, fresh)
