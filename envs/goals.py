"""Goal spaces: what a goal-conditioned agent (CRL) needs from an environment, and the pinpad one.

A `GoalEnv` is an `Env` that also says
- `goal_space`: the Box goals live in;
- `achieved_goal(obs)`: the goal a state realises, a pure function of the observation (batched
  over leading axes), so that an agent can relabel any stored observation as a goal;
- `desired_goal(state, params)`: the goal of the episode, which the agent is commanded and
  evaluated with. Success is the environment's own `info["success"]`.
The goal is not part of the observation: the agent gets (observation, goal) as two inputs.

`PinpadProgressGoal` turns a pinpad environment into a goal-reaching one (DECIDE, see
hrl/algos/crl.py for why): the observation gains a one-hot of the progress count (colours
correctly visited so far, 0 .. the longest task's length), the achieved goal is that one-hot,
and the desired goal is "progress = the task's length", i.e. the task is complete. The task stays
hidden; the default params are the post-training task. Any pinpad env whose state has a
`progress` field fits (the grid now, the ant later).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from envs.base import Box, Env
from envs.wrappers import Wrapper


class GoalEnv(Env):
    """The goal-reaching interface on top of `Env` (see the module docstring)."""

    @property
    def goal_space(self) -> Box:
        raise NotImplementedError

    def achieved_goal(self, obs: jax.Array) -> jax.Array:
        """obs [..., obs_dim] -> goal [..., goal_dim]."""
        raise NotImplementedError

    def desired_goal(self, state, params) -> jax.Array:
        """The episode's goal [goal_dim]."""
        raise NotImplementedError


class PinpadProgressGoal(Wrapper, GoalEnv):
    """A pinpad env whose observation ends with the one-hot progress count, with "task complete"
    as the goal (see the module docstring)."""

    def __init__(self, env: Env):
        super().__init__(env)
        self.name = env.name.replace("-v", "Goal-v")
        self.max_progress = int(env.posttrain_params().tasks.colours.shape[1])  # static: the task table's width

    @property
    def default_params(self):
        return self.env.posttrain_params()

    @property
    def observation_space(self) -> Box:
        inner = self.env.observation_space  # the one-hot count joins the inner range (the grid's is 0..1)
        return Box(min(inner.low, 0), max(inner.high, 1), (inner.shape[0] + self.max_progress + 1,), inner.dtype)

    @property
    def goal_space(self) -> Box:
        return Box(0, 1, (self.max_progress + 1,), self.env.observation_space.dtype)

    def _with_progress(self, obs: jax.Array, progress: jax.Array) -> jax.Array:
        return jnp.concatenate([obs, jax.nn.one_hot(progress, self.max_progress + 1, dtype=obs.dtype)])

    def reset(self, key, params):
        obs, state = self.env.reset(key, params)
        return self._with_progress(obs, state.progress), state

    def step(self, key, state, action, params):
        obs, state, reward, terminated, truncated, info = self.env.step(key, state, action, params)
        return self._with_progress(obs, state.progress), state, reward, terminated, truncated, info

    def observe(self, state, params) -> jax.Array:
        return self._with_progress(self.env.observe(state, params), state.progress)

    def achieved_goal(self, obs: jax.Array) -> jax.Array:
        return obs[..., -(self.max_progress + 1):]

    def desired_goal(self, state, params) -> jax.Array:
        length = params.tasks.lengths[state.task]
        return jax.nn.one_hot(length, self.max_progress + 1, dtype=self.goal_space.dtype)
