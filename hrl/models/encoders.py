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

- "egocentric_grid_paths": "egocentric_grid" plus, for each colour of gridworld-pinpad, which of
  the agent's four moves lie on a shortest path to it (walls and the other colours in the way, as
  for the expert) and whether it is out of reach (`path_features`): 8 x 5 bits that a search over
  the layout computes from the observation alone (DECIDE, not in the paper: a perception shortcut
  for a CPU budget). The quick preset's base models lost most of their failed episodes to
  navigation: in 512 any-task episodes of a seed-0 base, 45 of the 51 that ran out of time had a
  next colour within reach (median 8 moves) and wandered there with a near-uniform policy. With the
  paths given, what is left to learn is the paper's question: which colour comes next.

The token embedding is linear in these features (`embed`). The egocentric features are 2834
numbers of which 26 are nonzero for 13 objects (plus the 49 "inside" marks, a function of
the agent's cell alone), so `embed` sums the kernel rows of the nonzero features instead of
multiplying by the dense vector: the same linear map (tested against `encode`), at a
hundredth of the FLOPs of what was half of the quick model's compute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from envs.grid_pinpad import MOVES, NUM_COLOURS, NUM_WALLS

ENCODERS = ("flat", "egocentric_grid", "egocentric_grid_paths")
# Relaxation sweeps of the shortest-path search: a colour further than this reads as out of reach.
# Longer shortest paths are rare in a 7 x 7 grid and each sweep costs as much as the next.
PATH_SWEEPS = 24
PATH_FEATURES = NUM_COLOURS * (len(MOVES) + 1)


def feature_dim(encoder: str, obs_dim: int, grid_shape: tuple[int, int, int] | None) -> int:
    if encoder == "flat":
        return obs_dim
    rows, cols, channels = require_grid(grid_shape)
    paths = PATH_FEATURES if encoder == "egocentric_grid_paths" else 0
    return (2 * rows - 1) * (2 * cols - 1) * channels + obs_dim + paths


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
    features = [window.reshape(obs.shape[:-1] + (-1,)), obs]
    if encoder == "egocentric_grid_paths":
        features.append(path_features(obs, grid_shape))
    return jnp.concatenate(features, axis=-1)


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
    embedded = kernel[rows_used].sum(-2) + _inside_embedding(kernel, grid_shape)[cells[..., -1]] + bias
    if encoder == "egocentric_grid_paths":
        embedded = embedded + path_features(obs, grid_shape) @ kernel[-PATH_FEATURES:]
    return embedded


def path_features(obs: jax.Array, grid_shape: tuple[int, int, int] | None) -> jax.Array:
    """obs [..., obs_dim] (gridworld-pinpad's channels) -> [..., PATH_FEATURES] float32: for each
    colour c, four bits (in the order of the actions) saying which moves from the agent's cell
    lie on a shortest path to c, then one bit saying that c is out of reach. Paths avoid the walls
    and every other colour (the expert's obstacles) and are searched for `PATH_SWEEPS` steps."""
    rows, cols, channels = require_grid(grid_shape)
    grid = obs.reshape((-1, rows, cols, channels)).astype(bool)
    colours = grid[..., NUM_WALLS:NUM_WALLS + NUM_COLOURS]  # [N, rows, cols, colour]
    # Batch last: the sweeps then run over long contiguous rows of episodes.
    passable = jnp.moveaxis(~grid[..., :-1].any(-1, keepdims=True) | colours, 0, -1)  # the target's own cell too
    far = rows * cols
    distance = jnp.where(jnp.moveaxis(colours, 0, -1), 0, far).astype(jnp.int8)  # [rows, cols, colour, N], from each colour

    def pad(d):
        return jnp.pad(d, ((1, 1), (1, 1), (0, 0), (0, 0)), constant_values=far)

    def sweep(_, d):
        p = pad(d)
        nearest = jnp.minimum(jnp.minimum(p[:-2, 1:-1], p[2:, 1:-1]), jnp.minimum(p[1:-1, :-2], p[1:-1, 2:]))
        return jnp.where(passable, jnp.minimum(d, nearest + 1), far)

    distance = jnp.moveaxis(pad(jax.lax.fori_loop(0, PATH_SWEEPS, sweep, distance)), -1, 0)  # [N, rows+2, cols+2, colour]
    row, col = jnp.divmod(jnp.argmax(grid[..., -1].reshape(grid.shape[0], -1), axis=-1), cols)
    episodes = jnp.arange(grid.shape[0])[:, None]
    after_move = distance[episodes, row[:, None] + 1 + MOVES[:, 0], col[:, None] + 1 + MOVES[:, 1]]  # [N, move, colour]
    closest = after_move.min(axis=1, keepdims=True)
    out_of_reach = closest >= far
    on_a_shortest_path = (after_move == closest) & ~out_of_reach
    features = jnp.concatenate([on_a_shortest_path, out_of_reach], axis=1)  # [N, move + 1, colour]
    return jnp.swapaxes(features, 1, 2).reshape(obs.shape[:-1] + (PATH_FEATURES,)).astype(jnp.float32)


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
        raise ValueError("the egocentric_grid encoder needs the observation's grid shape (rows, columns, channels)")
    return grid_shape
