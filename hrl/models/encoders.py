"""Observation encoders: how one observation becomes one token's input features.

- "flat": the observation as it is (the paper's choice: a linear embedding of o_t).
- "egocentric_grid": for grid observations laid out as (rows, columns, channels) with one channel
  marking the agent, the grid shifted so the agent sits at the centre of a (2 rows - 1) x
  (2 columns - 1) window, plus a channel marking which window cells lie inside the grid, then the
  flat observation after it. Where a colour lies relative to the agent, the quantity the
  shortest-path expert acts on, becomes a linear feature instead of a product of two one-hots,
  which a small model on a CPU budget learns far faster (DECIDE, see configs/gridworld/quick.yaml).

With `TransformerConfig.embed_moves`, a token also gets a learned vector for how the agent moved
into its cell since the previous observation (`agent_moves`: no previous step, stayed, up, down,
left, right). That is a function of two observations, not the action taken, and is computed from
the agent's channel.

The token embedding is linear in these features (`embed`). The egocentric features are 2834
numbers of which 26 are nonzero for 13 objects (plus the 49 "inside" marks, a function of
the agent's cell alone), so `embed` sums the kernel rows of the nonzero features instead of
multiplying by the dense vector: the same linear map (tested against `encode`), at a
hundredth of the FLOPs of what was half of the quick model's compute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ENCODERS = ("flat", "egocentric_grid")


def feature_dim(encoder: str, obs_dim: int, grid_shape: tuple[int, int, int] | None) -> int:
    if encoder == "flat":
        return obs_dim
    rows, cols, channels = require_grid(grid_shape)
    return (2 * rows - 1) * (2 * cols - 1) * channels + obs_dim


def encode(encoder: str, obs: jax.Array, grid_shape: tuple[int, int, int] | None) -> jax.Array:
    """obs [..., obs_dim] -> features [..., feature_dim] (float32)."""
    obs = obs.astype(jnp.float32)
    if encoder == "flat":
        return obs
    rows, cols, channels = require_grid(grid_shape)
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


NUM_MOVES = 6  # no previous step (an episode's first), stayed, up, down, left, right


def agent_cell(obs: jax.Array, grid_shape: tuple[int, int, int] | None) -> jax.Array:
    """obs [..., obs_dim] -> the index (row * columns + column) of the agent's cell [...]."""
    rows, cols, channels = require_grid(grid_shape)
    agent = obs.reshape(obs.shape[:-1] + (rows * cols, channels))[..., -1]
    return jnp.argmax(agent, axis=-1).astype(jnp.int32)


def move_between(previous_cell: jax.Array, cell: jax.Array, grid_shape: tuple[int, int, int] | None) -> jax.Array:
    """The move id (see NUM_MOVES) from `previous_cell` to `cell`; a negative previous cell means
    there was no previous step."""
    cols = require_grid(grid_shape)[1]
    step = cell - previous_cell
    return jnp.select([previous_cell < 0, step == 0, step == -cols, step == cols, step == -1], [0, 1, 2, 3, 4], 5)


def agent_moves(obs: jax.Array, grid_shape: tuple[int, int, int] | None, segments: jax.Array | None = None) -> jax.Array:
    """obs [..., T, obs_dim] -> the move id into each step's cell [..., T]; the first step of a
    sequence, and of each packed episode (where `segments` [..., T] changes), has no previous step."""
    cells = agent_cell(obs, grid_shape)
    previous = jnp.concatenate([jnp.full_like(cells[..., :1], -1), cells[..., :-1]], axis=-1)
    if segments is not None:
        episode_starts = jnp.concatenate(
            [jnp.ones_like(segments[..., :1], bool), segments[..., 1:] != segments[..., :-1]], axis=-1)
        previous = jnp.where(episode_starts, -1, previous)
    return move_between(previous, cells, grid_shape)


def embed(encoder: str, obs: jax.Array, kernel: jax.Array, bias: jax.Array,
          grid_shape: tuple[int, int, int] | None) -> jax.Array:
    """encode(obs) @ kernel + bias, computed sparsely for "egocentric_grid". That form assumes,
    as in gridworld-pinpad's observation, that every channel marks exactly one cell."""
    if encoder == "flat":
        return obs.astype(jnp.float32) @ kernel + bias
    rows, cols, channels = require_grid(grid_shape)
    window_rows, window_cols = 2 * rows - 1, 2 * cols - 1
    cells = jnp.argmax(obs.reshape(obs.shape[:-1] + (rows * cols, channels)), axis=-2)  # [..., channels]
    row, col = jnp.divmod(cells, cols)
    agent_row, agent_col = row[..., -1:], col[..., -1:]
    # Window cell of each object relative to the agent; a window cell holds `channels` features
    # (the objects' channels, then "inside"); the flat observation follows the window.
    window_cell = (row - agent_row + rows - 1) * window_cols + (col - agent_col + cols - 1)
    object_rows = window_cell[..., :-1] * channels + jnp.arange(channels - 1)
    flat_rows = window_rows * window_cols * channels + cells * channels + jnp.arange(channels)
    rows_used = jnp.concatenate([object_rows, flat_rows], axis=-1)
    return kernel[rows_used].sum(-2) + _inside_embedding(kernel, grid_shape)[cells[..., -1]] + bias


def _inside_embedding(kernel: jax.Array, grid_shape: tuple[int, int, int]) -> jax.Array:
    """[rows * cols, width]: the "inside" features' contribution for each cell of the agent."""
    rows, cols, channels = grid_shape
    agent_row, agent_col = jnp.divmod(jnp.arange(rows * cols), cols)
    inside = _shift(2 * rows - 1, rows, agent_row).sum(-1)[:, :, None] * _shift(2 * cols - 1, cols, agent_col).sum(-1)[:, None, :]
    inside_rows = kernel[: (2 * rows - 1) * (2 * cols - 1) * channels][channels - 1 :: channels]
    return inside.reshape(rows * cols, -1) @ inside_rows


def _shift(window: int, size: int, agent: jax.Array) -> jax.Array:
    """[..., window, size] one-hot: window index i looks at grid index i - (size - 1) + agent."""
    source = jnp.arange(window)[:, None] - (size - 1) + agent[..., None, None]
    return (source == jnp.arange(size)).astype(jnp.float32)


def require_grid(grid_shape):
    if grid_shape is None:
        raise ValueError("the egocentric_grid encoder and embed_moves need the observation's grid shape "
                         "(rows, columns, channels)")
    return grid_shape
