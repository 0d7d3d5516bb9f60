"""gridworld goal reaching: walk to a goal cell of the pinpad grid. A test bed for goal-conditioned
agents (CRL), with the grid's geometry and moves but no colours and no hidden task.

- A 7x7 grid, `num_walls` wall cells (4, as in gridworld-pinpad), the agent's start cell and the
  goal cell, all distinct and drawn uniformly anew every episode.
- Actions 0..3: up, right, down, left; moving into a wall or off the grid leaves the agent in place
  (the moves of `envs.grid_pinpad`).
- Reaching the goal cell gives reward 1 and ends the episode (terminated, `info["success"]`);
  otherwise reward 0 and truncation after `horizon` steps.
- Observation: 49 cells x 2 channels of {0, 1} (uint8), cell-major: channel 0 a wall, channel 1 the
  agent. The goal is not in the observation: it is the goal-space part of a `GoalEnv`.
- Goal space: the one-hot of a cell (49 values). `achieved_goal(obs)` is the agent channel;
  `desired_goal` is the episode's goal cell.
- `solvable_only=True` redraws layouts until the goal can be reached from the start within the
  horizon (with 4 walls a corner or edge cell can be walled in).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from envs.base import Box, Discrete
from envs.goals import GoalEnv
from envs.grid_pinpad import NUM_CELLS, SIZE, UNREACHABLE, distances_to, distinct_cells, move

NUM_CHANNELS = 2  # wall, agent
WALL, AGENT = 0, 1


@struct.dataclass
class GridGoalState:
    agent: jax.Array  # cell index row * 7 + column
    goal: jax.Array  # cell index
    wall_cells: jax.Array  # [num_walls]
    t: jax.Array  # steps taken


@struct.dataclass
class GridGoalParams:
    """Nothing to choose per episode yet: the goal and the layout are drawn at reset."""


class GridGoal(GoalEnv):
    name = "GridGoal-v0"
    grid_shape = (SIZE, SIZE, NUM_CHANNELS)

    def __init__(self, horizon: int = 50, solvable_only: bool = False, num_walls: int = 4):
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        if not 0 <= num_walls <= NUM_CELLS - 2:
            raise ValueError(f"num_walls must be in 0..{NUM_CELLS - 2}, got {num_walls}")
        self.horizon = horizon
        self.solvable_only = solvable_only
        self.num_walls = num_walls

    @property
    def default_params(self) -> GridGoalParams:
        return GridGoalParams()

    @property
    def observation_space(self) -> Box:
        return Box(0, 1, (NUM_CELLS * NUM_CHANNELS,), jnp.uint8)

    @property
    def action_space(self) -> Discrete:
        return Discrete(4)

    @property
    def goal_space(self) -> Box:
        return Box(0, 1, (NUM_CELLS,), jnp.uint8)

    @property
    def max_steps(self) -> int:
        return self.horizon

    @property
    def num_subgoals(self) -> int:
        return 1  # the goal itself

    def reset(self, key: jax.Array, params: GridGoalParams):
        if not self.solvable_only:
            return self._draw(key)

        def unsolvable(carry):
            _, (_, state) = carry
            return ~self.goal_reachable_in_time(state)

        def redraw(carry):
            attempt, _ = carry
            return attempt + 1, self._draw(jax.random.fold_in(key, attempt + 1))

        _, (obs, state) = jax.lax.while_loop(unsolvable, redraw, (0, self._draw(key)))
        return obs, state

    def _draw(self, key: jax.Array):
        cells = distinct_cells(jax.random.uniform(key, (2 + self.num_walls,)))
        state = GridGoalState(agent=cells[0], goal=cells[1], wall_cells=cells[2:], t=jnp.int32(0))
        return observe(state), state

    def step(self, key, state: GridGoalState, action, params: GridGoalParams):
        del key  # deterministic
        agent = move(state, action)  # the pinpad's moves: it reads only `agent` and `wall_cells`
        state = state.replace(agent=agent, t=state.t + 1)
        success = agent == state.goal
        truncated = (state.t >= self.horizon) & ~success
        info = {"success": success, "subgoal": jnp.where(success, -1, 0), "progress": success.astype(jnp.int32),
                "task_id": jnp.int32(0)}
        return observe(state), state, success.astype(jnp.float32), success, truncated, info

    def observe(self, state: GridGoalState, params: GridGoalParams | None = None) -> jax.Array:
        return observe(state)

    def subgoal(self, state: GridGoalState, params: GridGoalParams) -> jax.Array:
        return jnp.where(state.agent == state.goal, -1, 0)

    def achieved_goal(self, obs: jax.Array) -> jax.Array:
        return obs.reshape(obs.shape[:-1] + (NUM_CELLS, NUM_CHANNELS))[..., AGENT]

    def desired_goal(self, state: GridGoalState, params: GridGoalParams) -> jax.Array:
        return jax.nn.one_hot(state.goal, NUM_CELLS, dtype=jnp.uint8)

    def shortest_path_length(self, state: GridGoalState) -> jax.Array:
        """Moves from the agent to the goal around the walls (UNREACHABLE if walled off)."""
        walls = jnp.any(jnp.arange(NUM_CELLS)[:, None] == state.wall_cells[None, :], axis=1)
        return distances_to(state.goal, walls)[state.agent]

    def goal_reachable_in_time(self, state: GridGoalState) -> jax.Array:
        distance = self.shortest_path_length(state)
        return (distance < UNREACHABLE) & (distance <= self.horizon - state.t)


def observe(state: GridGoalState) -> jax.Array:
    ones_at = jnp.concatenate([state.wall_cells * NUM_CHANNELS + WALL, state.agent[None] * NUM_CHANNELS + AGENT])
    return jnp.zeros(NUM_CELLS * NUM_CHANNELS, jnp.uint8).at[ones_at].set(1, unique_indices=True)
