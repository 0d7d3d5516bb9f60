"""Observation encoders: how one observation becomes one token's input features.

- "flat": the observation as it is (the paper's choice: a linear embedding of o_t).
- "egocentric_grid": for grid observations laid out as (rows, columns, channels) with one channel
  marking the agent, the grid shifted so the agent sits at the centre of a (2 rows - 1) x
  (2 columns - 1) window, plus a channel marking which window cells lie inside the grid, then the
  flat observation after it. Where a colour lies relative to the agent, the quantity the
  shortest-path expert acts on, becomes a linear feature instead of a product of two one-hots,
  which a small model on a CPU budget learns far faster (DECIDE, see configs/gridworld/quick.yaml).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ENCODERS = ("flat", "egocentric_grid")


def feature_dim(encoder: str, obs_dim: int, grid_shape: tuple[int, int, int] | None) -> int:
    if encoder == "flat":
        return obs_dim
    rows, cols, channels = _require_grid(grid_shape)
    return (2 * rows - 1) * (2 * cols - 1) * channels + obs_dim


def encode(encoder: str, obs: jax.Array, grid_shape: tuple[int, int, int] | None) -> jax.Array:
    """obs [..., obs_dim] -> features [..., feature_dim] (float32)."""
    obs = obs.astype(jnp.float32)
    if encoder == "flat":
        return obs
    rows, cols, channels = _require_grid(grid_shape)
    grid = obs.reshape(obs.shape[:-1] + (rows, cols, channels))
    agent = grid[..., -1].reshape(obs.shape[:-1] + (rows * cols,))
    row, col = jnp.divmod(jnp.argmax(agent, axis=-1), cols)
    # Shift matrices: window row i shows grid row i - (rows - 1) + agent row.
    pick_row = _shift(2 * rows - 1, rows, row)
    pick_col = _shift(2 * cols - 1, cols, col)
    objects = jnp.einsum("...ia,...abk,...jb->...ijk", pick_row, grid[..., :-1], pick_col)
    inside = pick_row.sum(-1)[..., :, None] * pick_col.sum(-1)[..., None, :]
    window = jnp.concatenate([objects, inside[..., None]], axis=-1)
    return jnp.concatenate([window.reshape(obs.shape[:-1] + (-1,)), obs], axis=-1)


def _shift(window: int, size: int, agent: jax.Array) -> jax.Array:
    """[..., window, size] one-hot: window index i looks at grid index i - (size - 1) + agent."""
    source = jnp.arange(window)[:, None] - (size - 1) + agent[..., None, None]
    return (source == jnp.arange(size)).astype(jnp.float32)


def _require_grid(grid_shape):
    if grid_shape is None:
        raise ValueError("the egocentric_grid encoder needs the observation's grid shape (rows, columns, channels)")
    return grid_shape
