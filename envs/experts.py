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

import jax
import jax.numpy as jnp

from envs import pinpad
from envs.grid_pinpad import UNREACHABLE, GridState, distances_to, move, obstacles


def optimal_moves(state: GridState, params: pinpad.PinpadParams) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (optimal [4] bool, safe [4] bool, reachable): the moves on a shortest path to the
    next colour of the first task still alive (the drawn task, unless params.any_task), and the
    moves that do not step onto a wrong colour."""
    target_colour = pinpad.next_colour(params.tasks, state.alive, state.progress)
    blocked = obstacles(state, target_colour)
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


def move_probabilities(state: GridState, params: pinpad.PinpadParams, epsilon: float | jax.Array = 0.0) -> jax.Array:
    """[4] the probability of each move of the epsilon-noisy expert (`shortest_path_action`)."""
    optimal, safe, reachable = optimal_moves(state, params)
    random_safe = safe / jnp.sum(safe)
    return jnp.where(reachable, (1 - epsilon) * optimal / jnp.sum(optimal) + epsilon * random_safe, random_safe)


def per_task(state: GridState, params: pinpad.PinpadParams, epsilon: float | jax.Array = 0.0
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What a task-blind observer of the expert can compute at this state, for each task k of the
    set: (consistent [K] bool: the colours visited so far begin task k; clean [K, 4]: the
    noise-free expert's distribution if the task were k; moves [K, 4]: the noisy expert's move
    probabilities if it were k). `clean` and `moves` mean something only where `consistent`."""
    tasks = params.tasks.colours
    visited = tasks[state.task]  # the drawn task's colours, of which the first `progress` are visited
    consistent = jnp.all((tasks == visited) | (jnp.arange(tasks.shape[1]) >= state.progress), axis=1)

    def as_task(k):
        as_k = state.replace(alive=jnp.arange(tasks.shape[0]) == k)
        return expert_probabilities(as_k, params), move_probabilities(as_k, params, epsilon)

    clean, moves = jax.vmap(as_task)(jnp.arange(tasks.shape[0]))
    return consistent, clean, moves


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
