"""Expert policies. Grid: the stochastic shortest-path expert of the paper (appendix C.1).

The expert walks to the next colour of the task along a shortest path, treating walls and every
other colour as obstacles, and picks uniformly among all moves that are optimal. With probability
`epsilon` it instead takes a uniformly random move that does not step onto a wrong colour.

Unsolvable layouts (see envs.grid_pinpad): the datasets use `GridPinpad(solvable_only=True)`,
where the expert solves every episode (tested). In a layout it cannot solve, the expert takes
random safe moves (`shortest_path_action` reports `reachable=False`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from envs import pinpad
from envs.grid_pinpad import IMPOSSIBLE, SIZE, UNREACHABLE, GridState, distances_to, move, obstacles


def optimal_moves(state: GridState, params: pinpad.PinpadParams) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (optimal [4] bool, safe [4] bool, reachable): the moves on a shortest path to the
    next colour of the first task still alive (the drawn task, unless params.any_task), and the
    moves that do not step onto a wrong colour."""
    return moves_towards(state, pinpad.next_colour(params.tasks, state.alive, state.progress))


def moves_towards(state: GridState, target_colour: jax.Array, dist: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`optimal_moves` for a given target colour; `dist` is its distance map when already known."""
    blocked = obstacles(state, target_colour)
    if dist is None:
        dist = distances_to(state.colour_cells[target_colour], blocked)

    destinations = jax.vmap(lambda a: move(state, a))(jnp.arange(4))
    moves_away = destinations != state.agent
    # Bumping into a wall or the border is safe (the agent stays); stepping onto a wrong colour is not.
    safe = ~moves_away | ~blocked[destinations]
    safe = jnp.where(jnp.any(safe), safe, True)  # boxed in by wrong colours: every move fails
    move_dist = jnp.where(moves_away, dist[destinations], UNREACHABLE)
    best = jnp.min(move_dist)
    reachable = best < UNREACHABLE
    return (move_dist == best) & reachable, safe, reachable


def shortest_path_action(
    key: jax.Array, state: GridState, params: pinpad.PinpadParams, epsilon: float | jax.Array = 0.0
) -> tuple[jax.Array, jax.Array]:
    """Returns (action, reachable): uniform among the optimal moves, or with probability
    `epsilon` (always, when the target is unreachable) uniform among the safe moves."""
    optimal, safe, reachable = optimal_moves(state, params)
    return _choose(key, optimal, safe, reachable, epsilon), reachable


def expert_probabilities(state: GridState, params: pinpad.PinpadParams) -> jax.Array:
    """[4] the noise-free expert's action distribution: uniform over the optimal moves (over the
    safe moves where the target is unreachable)."""
    return _noise_free_distribution(*optimal_moves(state, params))


def labelled_action(
    key: jax.Array, state: GridState, params: pinpad.PinpadParams, epsilon: float | jax.Array = 0.0
) -> tuple[jax.Array, jax.Array]:
    """(`shortest_path_action`'s action, `expert_probabilities`) from one shortest-path search:
    a noisy expert's move and the noise-free expert's distribution at the same state."""
    optimal, safe, reachable = optimal_moves(state, params)
    return _choose(key, optimal, safe, reachable, epsilon), _noise_free_distribution(optimal, safe, reachable)


def move_probabilities(optimal: jax.Array, safe: jax.Array, reachable: jax.Array, epsilon: float | jax.Array
                       ) -> jax.Array:
    """[4] the probability of each move of the epsilon-noisy expert (`shortest_path_action`), from
    `optimal_moves`'s result."""
    random_safe = safe / jnp.sum(safe)
    return jnp.where(reachable, (1 - epsilon) * optimal / jnp.sum(optimal) + epsilon * random_safe, random_safe)


class SubgoalStartLabels(NamedTuple):
    """What the clean expert would do at a state, were each subgoal the next one."""

    moves: jax.Array  # [G, 4] the noise-free expert's distribution towards subgoal g's first colour
    between_subgoals: jax.Array  # bool: no colour of the next subgoal is visited yet (or the episode starts)


def subgoal_start_labels(state: GridState, params: pinpad.PinpadParams) -> SubgoalStartLabels:
    """`SubgoalStartLabels` at `state`: one shortest-path search per subgoal (4). Between subgoals,
    the move towards the real next subgoal is the expert's own (`expert_probabilities`); the others
    are counterfactual: where the episode would go had its task another next subgoal, including
    the transitions no pretraining task has."""
    first_colours = jnp.array([colours[0] for colours in pinpad.GRID_SUBGOALS.values()])
    moves = jax.vmap(lambda colour: _noise_free_distribution(*moves_towards(state, colour)))(first_colours)
    return SubgoalStartLabels(moves, state.progress % 2 == 0)


class TaskView(NamedTuple):
    """What a task-blind observer of the expert can compute at a state, for each task k of the set."""

    consistent: jax.Array  # [K] bool: the colours visited so far begin task k
    clean: jax.Array  # [K, 4] the noise-free expert's distribution, were the task k
    moves: jax.Array  # [K, 4] the epsilon-noisy expert's move probabilities, were the task k
    doable: jax.Array  # [K] bool: task k can be finished from here within the horizon


def per_task(state: GridState, params: pinpad.PinpadParams, epsilon: float | jax.Array, horizon: int) -> TaskView:
    """`TaskView` at `state`. `clean` and `moves` mean something only where `consistent`; at an
    episode's first step `doable` is what `solvable_only` redraws for. One shortest-path search
    per colour (8) serves all K tasks."""
    colours = jnp.arange(state.colour_cells.shape[0])
    dist = jax.vmap(lambda c: distances_to(state.colour_cells[c], obstacles(state, c)))(colours)  # [8, 49]
    optimal, safe, reachable = jax.vmap(lambda c, d: moves_towards(state, c, d))(colours, dist)
    clean = jax.vmap(_noise_free_distribution)(optimal, safe, reachable)
    moves = jax.vmap(lambda o, s, r: move_probabilities(o, s, r, epsilon))(optimal, safe, reachable)

    tasks = params.tasks.colours  # [K, L], -1 after a task's end
    visited = tasks[state.task]  # the drawn task, of which the first `progress` colours are visited
    begins_alike = jnp.all((tasks == visited) | (jnp.arange(tasks.shape[1]) >= state.progress), axis=1)
    # With any_task the env keeps exactly those tasks alive; the drawn task is not the one pursued.
    consistent = jnp.where(params.any_task, state.alive, begins_alike)
    next_colour = jnp.maximum(tasks[:, jnp.minimum(state.progress, tasks.shape[1] - 1)], 0)
    # A leg from a cell: its distance, or one step more than its best neighbour's when the cell is
    # itself an obstacle of the map (the colour just visited, where the next leg starts).
    from_cell = jnp.minimum(dist, _neighbour_min(dist) + 1)  # [8, 49]

    def steps_needed(task_colours):
        def leg(k):
            colour = task_colours[k]
            source = jnp.where(k == state.progress, state.agent, state.colour_cells[task_colours[jnp.maximum(k - 1, 0)]])
            steps = from_cell[jnp.maximum(colour, 0), source]
            needed = (k >= state.progress) & (colour >= 0)
            return jnp.where(needed, jnp.where(steps < UNREACHABLE, steps, IMPOSSIBLE), 0)

        return jnp.sum(jax.vmap(leg)(jnp.arange(task_colours.shape[0])))

    doable = jax.vmap(steps_needed)(tasks) <= horizon - state.t
    return TaskView(consistent, clean[next_colour], moves[next_colour], doable)


def _neighbour_min(dist: jax.Array) -> jax.Array:
    """[..., 49] the least distance among each cell's four neighbours inside the grid."""
    grid = dist.reshape(dist.shape[:-1] + (SIZE, SIZE))
    pad = [(0, 0)] * (grid.ndim - 2) + [(1, 1), (1, 1)]
    padded = jnp.pad(grid, pad, constant_values=UNREACHABLE)
    neighbours = jnp.minimum(
        jnp.minimum(padded[..., :-2, 1:-1], padded[..., 2:, 1:-1]), jnp.minimum(padded[..., 1:-1, :-2], padded[..., 1:-1, 2:])
    )
    return neighbours.reshape(dist.shape)


def _choose(key, optimal, safe, reachable, epsilon):
    key_noise, key_optimal, key_random = jax.random.split(key, 3)

    def uniform_among(k, allowed):
        return jax.random.categorical(k, jnp.where(allowed, 0.0, -jnp.inf))

    noisy = ~reachable | (jax.random.uniform(key_noise) < epsilon)
    action = jnp.where(noisy, uniform_among(key_random, safe), uniform_among(key_optimal, optimal))
    return action.astype(jnp.int32)


def _noise_free_distribution(optimal, safe, reachable):
    allowed = jnp.where(reachable, optimal, safe).astype(jnp.float32)
    return allowed / jnp.sum(allowed)


@functools.lru_cache(maxsize=None)
def make_expert(env, epsilon: float = 0.0):
    """The expert of a registered environment as `(key, state, params) -> action`. Cached, so that
    jitted functions taking it as a static argument compile once per (env, epsilon)."""
    if env.name == "GridPinpad-v0":
        return lambda key, state, params: shortest_path_action(key, state, params, epsilon)[0]
    raise ValueError(f"no expert for environment {env.name!r}")


@functools.lru_cache(maxsize=None)
def make_labelled_expert(env, epsilon: float = 0.0):
    """`(key, state, params) -> (action, noise-free distribution)`: an epsilon-noisy expert's move
    and the clean expert's distribution at the same state (the labels of pretraining with
    `labels=expert`, see hrl.algos.pretrain)."""
    if env.name == "GridPinpad-v0":
        return lambda key, state, params: labelled_action(key, state, params, epsilon)
    raise ValueError(f"no expert for environment {env.name!r}")


@functools.lru_cache(maxsize=None)
def make_task_blind_labelled_expert(env, epsilon: float = 0.0):
    """`(key, state, params) -> (action, TaskView)`: an epsilon-noisy expert's move and what a
    task-blind observer can compute at its state (`per_task`; the labels of pretraining with
    `labels=posterior`, see hrl.algos.pretrain)."""
    if env.name == "GridPinpad-v0":
        return lambda key, state, params: (labelled_action(key, state, params, epsilon)[0],
                                           per_task(state, params, epsilon, env.horizon))
    raise ValueError(f"no expert for environment {env.name!r}")


def make_expert_distribution(env):
    """`(state, params) -> [4]` the clean expert's distribution over moves (`expert_probabilities`)
    of a registered environment (the targets of discovery with `labels=expert`)."""
    if env.name == "GridPinpad-v0":
        return expert_probabilities
    raise ValueError(f"no expert distribution for environment {env.name!r}")


def make_subgoal_start_labeller(env):
    """`(state, params) -> SubgoalStartLabels` of a registered environment (the labels of the
    supervised controllers' `counterfactual_weight`, see hrl.algos.controllers)."""
    if env.name == "GridPinpad-v0":
        return subgoal_start_labels
    raise ValueError(f"no subgoal-start labels for environment {env.name!r}")
