"""Pinpad rules shared by the grid world and the ant: task tables and the visit rule.

A task is a sequence of colours. The agent must visit them in order; visiting any other colour
ends the episode as a failure. The task is never observed.

One mechanism covers the three ways of choosing the task (see `TaskSet` and `PinpadParams`):
the state keeps, for every task of the set, whether the colours visited so far are a prefix of it
("alive"). A fixed or randomly drawn task starts with only that task alive; "any task of the set"
starts with all of them alive. A visit that leaves no task alive is a failure; a visit that
completes an alive task is a success.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# --- gridworld-pinpad: subgoals are colour pairs, tasks are written as subgoal letters.
GRID_SUBGOALS = {"A": (0, 1), "B": (2, 3), "C": (4, 5), "D": (6, 7)}
GRID_SUBGOAL_LETTERS = "".join(GRID_SUBGOALS)  # subgoal index g -> its letter (colours 2g, 2g + 1)
GRID_PRETRAIN_TASKS = (
    "A-C-A", "A-C-B", "A-D-B", "B-A-C", "B-D-B", "B-D-C", "C-A-C", "C-A-D",
    "C-B-D", "D-B-A", "D-B-D", "D-C-A", "A-D-C", "B-A-D", "C-B-A", "D-C-B",
)  # fmt: skip
GRID_POSTTRAIN_TASK = "A-B-C-D-A-B"

# --- ant-pinpad: each colour is a subgoal.
ANT_PRETRAIN_TASKS = (
    (0, 3, 2), (1, 0, 3), (2, 1, 0), (3, 2, 1), (0, 2, 0), (0, 2, 1), (0, 3, 1), (1, 0, 2),
    (1, 3, 1), (1, 3, 2), (2, 0, 2), (2, 0, 3), (2, 1, 3), (3, 1, 0), (3, 1, 3), (3, 2, 0),
)  # fmt: skip
ANT_POSTTRAIN_TASK = (0, 1, 2, 3)

# Global task ids, reported in info["task_id"]: the pretraining tasks are 0..15 in table order,
# the post-training task is 16, a task given by its subgoals (`subgoal_task_params`) is -1.
POSTTRAIN_TASK_ID = 16
OTHER_TASK_ID = -1


def grid_task_colours(task: str) -> tuple[int, ...]:
    """'A-C-A' -> (0, 1, 4, 5, 0, 1)."""
    try:
        return tuple(c for letter in task.split("-") for c in GRID_SUBGOALS[letter])
    except KeyError as err:
        raise ValueError(f"unknown grid subgoal {err} in task {task!r}; use A, B, C, D") from None


def grid_task_subgoals(task: str) -> tuple[int, ...]:
    """'A-C-A' -> (0, 2, 0): a grid task as subgoal indices."""
    grid_task_colours(task)  # validates the letters
    return tuple(GRID_SUBGOAL_LETTERS.index(letter) for letter in task.split("-"))


def subgoal_transitions(tasks: Sequence[Sequence[int]]) -> set[tuple[int, int]]:
    """The (subgoal, next subgoal) pairs that occur inside the given subgoal sequences."""
    return {(a, b) for task in tasks for a, b in zip(task[:-1], task[1:])}


@struct.dataclass
class TaskSet:
    """K tasks padded to a common length with -1. Part of an environment's params."""

    colours: jax.Array  # [K, L] int32
    lengths: jax.Array  # [K] int32
    ids: jax.Array  # [K] int32, global task ids (see POSTTRAIN_TASK_ID)

    @property
    def size(self) -> int:
        return self.colours.shape[0]


def make_task_set(
    tasks: Sequence[Sequence[int]], ids: Sequence[int], max_len: int, num_colours: int
) -> TaskSet:
    """Validates and pads colour sequences. `max_len` is static per environment so that task sets
    of different sizes share the same state shapes."""
    if len(tasks) == 0:
        raise ValueError("a task set needs at least one task")
    if len(tasks) != len(ids):
        raise ValueError(f"{len(tasks)} tasks but {len(ids)} ids")
    colours = np.full((len(tasks), max_len), -1, np.int32)
    for k, task in enumerate(tasks):
        if not 0 < len(task) <= max_len:
            raise ValueError(f"task {tuple(task)} has length {len(task)}; allowed 1..{max_len}")
        if any(not 0 <= c < num_colours for c in task):
            raise ValueError(f"task {tuple(task)} has a colour outside 0..{num_colours - 1}")
        # Re-entering the cell you stand on is impossible without leaving it first, which the
        # shortest-path expert never plans for: forbid the same colour twice in a row.
        if any(a == b for a, b in zip(task[:-1], task[1:])):
            raise ValueError(f"task {tuple(task)} repeats a colour consecutively")
        colours[k, : len(task)] = task
    return TaskSet(
        colours=jnp.asarray(colours),
        lengths=jnp.asarray([len(t) for t in tasks], jnp.int32),
        ids=jnp.asarray(ids, jnp.int32),
    )


@struct.dataclass
class PinpadParams:
    """How an episode's task is chosen.

    - a fixed task: a set of one task, any_task False;
    - a random task from a set: the set, any_task False (drawn uniformly at reset);
    - any task of a set: the set, any_task True (success when the visited colours complete any
      task of the set, failure once they are a prefix of none). This is how a base model that
      cannot see the task is evaluated.
    """

    tasks: TaskSet
    any_task: jax.Array  # bool scalar


def sample_task(draw: jax.Array, params: PinpadParams) -> tuple[jax.Array, jax.Array]:
    """Returns (task index into the set, alive mask [K]) for a new episode, from a uniform [0, 1)
    draw (one shared random call per reset is cheaper than a key split and a randint)."""
    index = jnp.minimum(jnp.floor(draw * params.tasks.size).astype(jnp.int32), params.tasks.size - 1)
    only_drawn = jnp.arange(params.tasks.size) == index
    alive = jnp.where(params.any_task, jnp.ones_like(only_drawn), only_drawn)
    return index, alive


def visit(
    tasks: TaskSet, alive: jax.Array, progress: jax.Array, colour: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Applies the visit of `colour` (-1: no visit this step).

    Returns (alive, progress, success, failure). `progress` counts colours correctly visited: a
    wrong colour ends the episode without adding to it.
    """
    visited = colour >= 0
    expected = tasks.colours[:, jnp.minimum(progress, tasks.colours.shape[1] - 1)]
    still_alive = alive & (expected == colour)
    new_alive = jnp.where(visited, still_alive, alive)
    failure = visited & ~jnp.any(new_alive)
    new_progress = progress + (visited & ~failure).astype(jnp.int32)
    success = visited & jnp.any(new_alive & (tasks.lengths == new_progress))
    return new_alive, new_progress, success, failure


def first_alive(alive: jax.Array) -> jax.Array:
    """Index of the task that defines the ground truth (the first alive one; 0 if none)."""
    return jnp.argmax(alive)


def next_colour(tasks: TaskSet, alive: jax.Array, progress: jax.Array) -> jax.Array:
    """The next colour of the first alive task (-1 once it is complete)."""
    task = tasks.colours[first_alive(alive)]
    return jnp.where(progress < task.shape[0], task[jnp.minimum(progress, task.shape[0] - 1)], -1)
