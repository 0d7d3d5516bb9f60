"""gridworld-pinpad (Kobayashi et al. 2025, appendix A): visit coloured cells in a hidden order.

- A 7x7 grid with 8 coloured cells (colours 0..7), 4 wall cells and the agent's start cell, all
  distinct and drawn uniformly anew every episode.
- Actions 0..3: up, right, down, left. Moving into a wall or off the grid leaves the agent where it
  is.
- A colour is visited when the agent enters its cell from another cell; standing still on it does
  not count again. Visiting the next colour of the task advances the task; visiting any other
  colour ends the episode (terminated, failure). Completing the task gives reward 1 and ends the
  episode (terminated, success). Otherwise the reward is 0 and the episode is truncated after
  `horizon` = 100 steps.
- Observation: 637 = 49 cells x 13 channels of {0, 1} (uint8), cell-major (row, column, channel):
  channels 0..3 one wall each, 4..11 colours 0..7, 12 the agent. No task, no visited flags.
- Layouts are uniform and not filtered: some layouts make a task impossible (a colour walled in by
  walls and other colours). `envs.experts.task_is_solvable` tells which; the expert datasets keep
  only solvable episodes and evaluations report success over all layouts (see hrl.data.expert).
- In the JAX functions an out-of-range action is clamped (JAX indexing); the gymnasium adapter
  refuses it with an error instead.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import struct

from envs import pinpad
from envs.base import Box, Discrete, Env

SIZE = 7
NUM_CELLS = SIZE * SIZE
NUM_COLOURS = 8
NUM_WALLS = 4
NUM_CHANNELS = NUM_WALLS + NUM_COLOURS + 1
OBS_DIM = NUM_CELLS * NUM_CHANNELS
MAX_TASK_LEN = 12  # the post-training task's 12 colours
# (row, column) change of each action: up, right, down, left.
MOVES = jnp.array([[-1, 0], [0, 1], [1, 0], [0, -1]], jnp.int32)


@struct.dataclass
class GridState:
    agent: jax.Array  # cell index row * 7 + column
    colour_cells: jax.Array  # [8] cell of colour c
    wall_cells: jax.Array  # [4]
    task: jax.Array  # index into params.tasks of the drawn task
    alive: jax.Array  # [K] tasks of which the visited colours are still a prefix
    progress: jax.Array  # colours correctly visited
    t: jax.Array  # steps taken


class GridPinpad(Env[GridState, pinpad.PinpadParams]):
    name = "GridPinpad-v0"

    def __init__(self, horizon: int = 100):
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.horizon = horizon

    # --- params
    def task_params(self, tasks: Sequence[str], ids: Sequence[int], any_task: bool = False):
        """Params for a set of tasks written as subgoal letters ('A-C-A')."""
        task_set = pinpad.make_task_set(
            [pinpad.grid_task_colours(t) for t in tasks], ids, MAX_TASK_LEN, NUM_COLOURS
        )
        return pinpad.PinpadParams(tasks=task_set, any_task=jnp.asarray(any_task))

    def pretrain_params(self, any_task: bool = False) -> pinpad.PinpadParams:
        """The 16 pretraining tasks: one drawn per episode, or (any_task) any of them counts."""
        tasks = pinpad.GRID_PRETRAIN_TASKS
        return self.task_params(tasks, range(len(tasks)), any_task)

    def posttrain_params(self) -> pinpad.PinpadParams:
        return self.task_params([pinpad.GRID_POSTTRAIN_TASK], [pinpad.POSTTRAIN_TASK_ID])

    def fixed_task_params(self, index: int) -> pinpad.PinpadParams:
        """One pretraining task, by its index in the table."""
        return self.task_params([pinpad.GRID_PRETRAIN_TASKS[index]], [index])

    @property
    def default_params(self) -> pinpad.PinpadParams:
        return self.pretrain_params()

    # --- spaces
    @property
    def observation_space(self) -> Box:
        return Box(0, 1, (OBS_DIM,), jnp.uint8)

    @property
    def action_space(self) -> Discrete:
        return Discrete(4)

    @property
    def max_steps(self) -> int:
        return self.horizon

    # --- dynamics
    def reset(self, key: jax.Array, params: pinpad.PinpadParams) -> tuple[jax.Array, GridState]:
        draws = jax.random.uniform(key, (2 + NUM_COLOURS + NUM_WALLS,))
        cells = distinct_cells(draws[1:])
        task, alive = pinpad.sample_task(draws[0], params)
        state = GridState(
            agent=cells[0],
            colour_cells=cells[1 : 1 + NUM_COLOURS],
            wall_cells=cells[1 + NUM_COLOURS : 1 + NUM_COLOURS + NUM_WALLS],
            task=task,
            alive=alive,
            progress=jnp.int32(0),
            t=jnp.int32(0),
        )
        return observe(state), state

    def observe(self, state: GridState, params: pinpad.PinpadParams) -> jax.Array:
        return observe(state)

    def step(self, key, state: GridState, action, params: pinpad.PinpadParams):
        del key  # the grid is deterministic
        agent = move(state, action)
        colour = jnp.where(agent != state.agent, colour_at(state, agent), -1)
        alive, progress, success, failure = pinpad.visit(params.tasks, state.alive, state.progress, colour)
        state = state.replace(agent=agent, alive=alive, progress=progress, t=state.t + 1)
        terminated = success | failure
        truncated = (state.t >= self.horizon) & ~terminated
        return observe(state), state, success.astype(jnp.float32), terminated, truncated, info(state, params, success)


def distinct_cells(draws: jax.Array) -> jax.Array:
    """`len(draws)` distinct cells, uniformly, from uniform [0, 1) draws: the first swaps of a
    Fisher-Yates shuffle of the 49 cells. Only the swapped positions are remembered (a list of
    writes), which costs a few hundred scalar selects instead of sorting or rewriting 49 cells
    per swap: a reset is the most expensive part of a step of the batched auto-reset."""
    written_at, written = [], []  # cells[written_at[k]] = written[k], later writes win

    def read(position):
        value = position
        for at, val in zip(written_at, written):
            value = jnp.where(at == position, val, value)
        return value

    chosen = []
    for i in range(draws.shape[0]):
        j = i + jnp.minimum(jnp.floor(draws[i] * (NUM_CELLS - i)).astype(jnp.int32), NUM_CELLS - 1 - i)
        chosen.append(read(j))
        written_at.append(j)
        written.append(read(jnp.int32(i)))
    return jnp.stack(chosen)


def move(state: GridState, action: jax.Array) -> jax.Array:
    """The agent's cell after `action`: unchanged when the move hits a wall or the border."""
    row, col = jnp.divmod(state.agent, SIZE)
    d_row, d_col = MOVES[action]
    new_row, new_col = row + d_row, col + d_col
    target = new_row * SIZE + new_col
    inside = (new_row >= 0) & (new_row < SIZE) & (new_col >= 0) & (new_col < SIZE)
    blocked = ~inside | jnp.any(state.wall_cells == target)
    return jnp.where(blocked, state.agent, target)


def colour_at(state: GridState, cell: jax.Array) -> jax.Array:
    """The colour on `cell`, or -1."""
    here = state.colour_cells == cell
    return jnp.where(jnp.any(here), jnp.argmax(here), -1)


def observe(state: GridState) -> jax.Array:
    objects = jnp.concatenate([state.wall_cells, state.colour_cells, state.agent[None]])
    return (jnp.arange(NUM_CELLS)[:, None] == objects[None, :]).astype(jnp.uint8).reshape(OBS_DIM)


def current_subgoal(state: GridState, params: pinpad.PinpadParams) -> jax.Array:
    """The ground-truth subgoal (0..3 for A..D) the agent is working on: that of the next colour
    of the first task still alive (with any_task, ties go to the first such task of the set)."""
    colour = pinpad.next_colour(params.tasks, state.alive, state.progress)
    return jnp.where(colour >= 0, colour // 2, -1)


def info(state: GridState, params: pinpad.PinpadParams, success: jax.Array) -> dict[str, jax.Array]:
    task = jnp.where(params.any_task, pinpad.first_alive(state.alive), state.task)
    return {
        "success": success,
        "subgoal": current_subgoal(state, params),
        "progress": state.progress,
        "task_id": params.tasks.ids[task],
    }
