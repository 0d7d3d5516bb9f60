"""Ant goal reaching: walk the MJX ant of ant-pinpad to an (x, y) target. The continuous-control
test bed of the goal-conditioned baseline (CRL, hrl/algos/crl.py), with ant-pinpad's body,
physics and arena but no cells, colours or hidden task.

- The arena of ant-pinpad (8 m x 8 m centred on the origin, no physical outer walls, nothing
  ends an episode at its edge). Start: the torso at a uniformly random point of the arena, with
  the start pose of `envs.ant_pinpad` (standing, random yaw, joints and velocities +-0.1).
  Goal: a uniformly random point of the arena at least `MIN_START_DISTANCE` (1 m) from the start
  (redrawn otherwise), so that no episode starts solved.
- Success: the torso's x, y within `SUCCESS_RADIUS` = 0.5 m of the goal after a step: reward 1,
  terminated, `info["success"]`. The torso height leaving [0.2, 1.0] terminates as a failure.
  Otherwise reward 0 and truncation after `horizon` (500) steps.
- Observation (29 float32): symlog of ant-pinpad's proprioception [27], then the torso x, y
  divided by the arena's half side (4 m) [2], clipped into +-100 as in ant-pinpad (400 m away
  from the origin). The goal is not in it: it is the goal-space part.
- Goal space: world x, y in metres. `achieved_goal(obs)` undoes the scaling of the observation's
  last two values (a power-of-two factor, so exactly); `desired_goal` is the episode's goal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from envs.ant_pinpad import (
    HALF_EXTENT,
    NUM_JOINTS,
    OBS_BOUND,
    PROPRIO_DIM,
    AntBody,
    healthy,
    initial_body,
    proprioception,
    simulate,
    symlog,
    torso_xy,
)
from envs.base import Box
from envs.goals import GoalEnv

SUCCESS_RADIUS = 0.5
MIN_START_DISTANCE = 1.0
OBS_DIM = PROPRIO_DIM + 2
XY = slice(PROPRIO_DIM, PROPRIO_DIM + 2)  # where the scaled torso x, y sit in the observation


@struct.dataclass
class AntGoalState:
    body: AntBody
    goal: jax.Array  # [2] world x, y
    t: jax.Array  # steps taken


@struct.dataclass
class AntGoalParams:
    """Nothing to choose per episode yet: start and goal are drawn at reset."""


class AntGoal(GoalEnv):
    name = "AntGoal-v0"

    def __init__(self, horizon: int = 500):
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.horizon = horizon

    @property
    def default_params(self) -> AntGoalParams:
        return AntGoalParams()

    @property
    def observation_space(self) -> Box:
        return Box(-OBS_BOUND, OBS_BOUND, (OBS_DIM,), jnp.float32)

    @property
    def action_space(self) -> Box:
        return Box(-1.0, 1.0, (NUM_JOINTS,), jnp.float32)

    @property
    def goal_space(self) -> Box:
        return Box(-HALF_EXTENT, HALF_EXTENT, (2,), jnp.float32)

    @property
    def max_steps(self) -> int:
        return self.horizon

    @property
    def num_subgoals(self) -> int:
        return 1  # the goal itself

    def reset(self, key: jax.Array, params: AntGoalParams):
        key_start, key_body, key_goal = jax.random.split(key, 3)
        start = jax.random.uniform(key_start, (2,), minval=-HALF_EXTENT, maxval=HALF_EXTENT)

        def draw_goal(attempt):
            return jax.random.uniform(jax.random.fold_in(key_goal, attempt), (2,), minval=-HALF_EXTENT, maxval=HALF_EXTENT)

        def too_close(carry):
            _, goal = carry
            return jnp.linalg.norm(goal - start) < MIN_START_DISTANCE

        _, goal = jax.lax.while_loop(too_close, lambda c: (c[0] + 1, draw_goal(c[0] + 1)), (0, draw_goal(0)))
        state = AntGoalState(body=initial_body(key_body, start), goal=goal, t=jnp.int32(0))
        return observe(state), state

    def step(self, key, state: AntGoalState, action, params: AntGoalParams):
        del key  # deterministic physics
        return self.transition(state, simulate(state.body, action))

    def transition(self, state: AntGoalState, body: AntBody):
        """The rules after the physics (separate from `step` so that tests can place the ant)."""
        state = state.replace(body=body, t=state.t + 1)
        success = reached(state)
        terminated = success | ~healthy(body)
        truncated = (state.t >= self.horizon) & ~terminated
        info = {"success": success, "subgoal": jnp.where(success, -1, 0), "progress": success.astype(jnp.int32),
                "task_id": jnp.int32(0)}
        return observe(state), state, success.astype(jnp.float32), terminated, truncated, info

    def observe(self, state: AntGoalState, params: AntGoalParams | None = None) -> jax.Array:
        return observe(state)

    def subgoal(self, state: AntGoalState, params: AntGoalParams) -> jax.Array:
        return jnp.where(reached(state), -1, 0)

    def achieved_goal(self, obs: jax.Array) -> jax.Array:
        return obs[..., XY] * HALF_EXTENT

    def desired_goal(self, state: AntGoalState, params: AntGoalParams) -> jax.Array:
        return state.goal


def reached(state: AntGoalState) -> jax.Array:
    return jnp.linalg.norm(torso_xy(state.body) - state.goal) < SUCCESS_RADIUS


def observe(state: AntGoalState) -> jax.Array:
    body = state.body
    features = jnp.concatenate([symlog(proprioception(body)), torso_xy(body) / HALF_EXTENT])
    return jnp.clip(features, -OBS_BOUND, OBS_BOUND).astype(jnp.float32)
