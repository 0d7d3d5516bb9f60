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
- Unsolvable layouts (DECIDE): uniform layouts often make the task impossible: a colour walled in
  by walls and other colours, or shortest legs adding up to more than the horizon. We measured
  (20,000 layouts, `tests/test_grid_pinpad.py` checks the order of magnitude) about 14% of
  layouts unsolvable for a drawn pretraining task and about 20% for the post-training task.
  `GridPinpad()` draws layouts uniformly, as the paper states; `GridPinpad(solvable_only=True)`
  redraws at reset until the drawn task can be completed within the horizon
  (`task_is_solvable`), at most `MAX_REDRAWS` times (then the last draw stands: a horizon too
  short for any layout gives unsolvable episodes instead of a hang). Expert data and the RL
  presets use `solvable_only=True`, so that success rates are out of 100% and the shortest-path
  expert solves every episode.
- Any-task episodes (a base model that cannot see the task is scored on completing any
  pretraining task) still draw a task, and `solvable_only` redraws until that task is doable:
  the layouts of the expert's data, in which no demonstrated task is impossible. Redrawing only
  until some task is doable would admit many layouts where the task a model pursues is walled in
  (6% of layouts rule out some task under the first rule, 18% under the second; measured on 512
  episodes), and the model never saw a demonstration of avoiding such a task.
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
UNREACHABLE = NUM_CELLS  # longer than any path on the grid
IMPOSSIBLE = 1 << 20  # more steps than any horizon
# solvable_only's redraws per reset. About 20% of uniform layouts are unsolvable at horizon 100, so
# 64 redraws all fail with probability 0.2^64: only a horizon too short for any layout reaches it.
MAX_REDRAWS = 64
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
    grid_shape = (SIZE, SIZE, NUM_CHANNELS)  # how the observation folds into cells (agent channel last)

    def __init__(self, horizon: int = 100, solvable_only: bool = False):
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.horizon = horizon
        self.solvable_only = solvable_only

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

    def subgoal_task_params(self, subgoals: Sequence[int]) -> pinpad.PinpadParams:
        """One task given as subgoal indices (0..3 for A..D), such as (0, 1) for A-B."""
        task = "-".join(pinpad.GRID_SUBGOAL_LETTERS[g] for g in subgoals)
        return self.task_params([task], [pinpad.OTHER_TASK_ID])

    @property
    def pretrain_subgoal_sequences(self) -> tuple[tuple[int, ...], ...]:
        """The pretraining tasks as subgoal indices, in table order."""
        return tuple(pinpad.grid_task_subgoals(task) for task in pinpad.GRID_PRETRAIN_TASKS)

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

    @property
    def num_subgoals(self) -> int:
        return len(pinpad.GRID_SUBGOALS)  # A..D, each a pair of colours

    # --- dynamics
    def reset(self, key: jax.Array, params: pinpad.PinpadParams) -> tuple[jax.Array, GridState]:
        if not self.solvable_only:
            return self._draw(key, params)

        # Redraw (keys folded from `key`) until a task still alive can be done within the horizon,
        # at most MAX_REDRAWS times: a horizon too short for any layout must not hang the program.
        def unsolvable(carry):
            attempt, (_, state) = carry
            return ~task_is_solvable(state, params, self.horizon) & (attempt < MAX_REDRAWS)

        def redraw(carry):
            attempt, _ = carry
            return attempt + 1, self._draw(jax.random.fold_in(key, attempt + 1), params)

        _, (obs, state) = jax.lax.while_loop(unsolvable, redraw, (0, self._draw(key, params)))
        return obs, state

    def _draw(self, key: jax.Array, params: pinpad.PinpadParams) -> tuple[jax.Array, GridState]:
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

    def subgoal(self, state: GridState, params: pinpad.PinpadParams) -> jax.Array:
        return current_subgoal(state, params)

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
    # Thirteen ones written into zeros: comparing all 637 bytes against the objects cost
    # 70% of a batched step (benchmarks/RESULTS.md).
    objects = jnp.concatenate([state.wall_cells, state.colour_cells, state.agent[None]])
    ones_at = objects * NUM_CHANNELS + jnp.arange(NUM_CHANNELS)
    return jnp.zeros(OBS_DIM, jnp.uint8).at[ones_at].set(1, unique_indices=True)


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


# --- geometry: shortest paths and solvability

def distances_to(target: jax.Array, blocked: jax.Array) -> jax.Array:
    """Moves from every cell to `target` (a cell index) through unblocked cells; UNREACHABLE where
    there is no path. `blocked` [49] bool; the target itself counts as free."""
    free = (~blocked).reshape(SIZE, SIZE) | (jnp.arange(NUM_CELLS) == target).reshape(SIZE, SIZE)
    start = jnp.where(jnp.arange(NUM_CELLS) == target, 0, UNREACHABLE).reshape(SIZE, SIZE)

    def relax(dist):
        padded = jnp.pad(dist, 1, constant_values=UNREACHABLE)
        neighbours = jnp.minimum(
            jnp.minimum(padded[:-2, 1:-1], padded[2:, 1:-1]), jnp.minimum(padded[1:-1, :-2], padded[1:-1, 2:])
        )
        return jnp.where(free, jnp.minimum(dist, neighbours + 1), UNREACHABLE)

    def changed(pair):
        old, new = pair
        return jnp.any(old != new)

    _, dist = jax.lax.while_loop(changed, lambda pair: (pair[1], relax(pair[1])), (start, relax(start)))
    return jnp.minimum(dist, UNREACHABLE).reshape(NUM_CELLS)


def obstacles(state: GridState, target_colour: jax.Array, also_free: jax.Array = -1) -> jax.Array:
    """[49] bool: walls and every colour but the target (and but the cell `also_free`)."""
    cells = jnp.arange(NUM_CELLS)
    walls = jnp.any(cells[:, None] == state.wall_cells[None, :], axis=1)
    other_colour = (jnp.arange(state.colour_cells.shape[0]) != target_colour)[None, :]
    colours = jnp.any((cells[:, None] == state.colour_cells[None, :]) & other_colour, axis=1)
    return (walls | colours) & (cells != also_free)


def task_steps_needed(state: GridState, tasks: pinpad.TaskSet, task: jax.Array) -> jax.Array:
    """The fewest steps that complete task `task` of the set from this state (IMPOSSIBLE or more
    if it cannot be done). Every leg starts on the previous colour's cell whatever the path, so this is
    the sum of the legs' shortest paths, each avoiding walls and the other colours."""
    colours = tasks.colours[task]

    def leg_steps(k):
        colour = colours[k]
        source = jnp.where(k == state.progress, state.agent, state.colour_cells[colours[jnp.maximum(k - 1, 0)]])
        dist = distances_to(state.colour_cells[colour], obstacles(state, colour, also_free=source))
        needed = (k >= state.progress) & (colour >= 0)
        return jnp.where(needed, jnp.where(dist[source] < UNREACHABLE, dist[source], IMPOSSIBLE), 0)

    return jnp.sum(jax.vmap(leg_steps)(jnp.arange(colours.shape[0])))


def task_is_solvable(state: GridState, params: pinpad.PinpadParams, horizon: int) -> jax.Array:
    """Whether the drawn task is still alive and can be completed within the horizon (a
    shortest-path agent does). With params.any_task as well: a task is drawn at reset all the same,
    and redrawing until it is doable gives the layouts of the expert's data (see `GridPinpad`)."""
    return state.alive[state.task] & (task_steps_needed(state, params.tasks, state.task) <= horizon - state.t)
