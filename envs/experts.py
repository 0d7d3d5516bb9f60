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

def shortest_path_action(
    key: jax.Array, state: GridState, params: pinpad.PinpadParams, epsilon: float | jax.Array = 0.0
) -> tuple[jax.Array, jax.Array]:
    """Returns (action, reachable). The target is the next colour of the first task still alive
    (the drawn task, unless params.any_task)."""
    key_noise, key_optimal, key_random = jax.random.split(key, 3)
    target_colour = pinpad.next_colour(params.tasks, state.alive, state.progress)
    blocked = obstacles(state, target_colour)
    dist = distances_to(state.colour_cells[target_colour], blocked)

    destinations = jax.vmap(lambda a: move(state, a))(jnp.arange(4))
    moves_away = destinations != state.agent
    # Bumping into a wall or the border is safe (the agent stays); stepping onto a wrong colour is not.
    safe = ~moves_away | ~blocked[destinations]
    move_dist = jnp.where(moves_away, dist[destinations], UNREACHABLE)
    best = jnp.min(move_dist)
    reachable = best < UNREACHABLE
    optimal = (move_dist == best) & reachable

    def uniform_among(k, allowed):
        return jax.random.categorical(k, jnp.where(allowed, 0.0, -jnp.inf))

    noisy = ~reachable | (jax.random.uniform(key_noise) < epsilon)
    safe = jnp.where(jnp.any(safe), safe, True)  # boxed in by wrong colours: every move fails
    action = jnp.where(noisy, uniform_among(key_random, safe), uniform_among(key_optimal, optimal))
    return action.astype(jnp.int32), reachable


@functools.lru_cache(maxsize=None)
def make_expert(env, epsilon: float = 0.0):
    """The expert of a registered environment as `(key, state, params) -> action`. Cached, so that
    jitted functions taking it as a static argument compile once per (env, epsilon)."""
    if env.name == "GridPinpad-v0":
        return lambda key, state, params: shortest_path_action(key, state, params, epsilon)[0]
    raise ValueError(f"no expert for environment {env.name!r}")
