"""The base autoregressive policy: a causal transformer with an open residual stream.

One token per time step, embedded from the observation o_t. The previous action is not
embedded (DECIDE): in the pinpad worlds it is visible in the change between consecutive
observations, and leaving it out removes the shortcut of copying the last action, which would
make the residual stream less about where the agent is going. With `embed_moves` (grid only),
that change is made explicit instead: the token adds a learned vector for how the agent moved
into its cell since o_{t-1} (stayed, or which way; `encoders.agent_moves`), a function of the
observations that a task-blind policy needs, since its own moves are its evidence of which
subgoal it is pursuing. Otherwise a block must find it by attending one step back and comparing.

Pre-norm blocks (attention with a learned relative-position bias, then a ReLU MLP). The residual
stream e_l is the activation after block l (e_0 is the embedding). Two linear heads read the
normalised last residual: the parameters of the action distribution and of the next-observation
prediction, whose families follow from the environment's spaces (`hrl.models.heads`: categorical
logits and Bernoulli bits for the grid, a diagonal Gaussian and a unit-variance Gaussian for the
ant). Both backbones (this one and `hrl.models.hawk.Hawk`) build them in `ResidualStreamModel`.

The stream can be opened at layer l:
- `lower(obs, l)` runs the embedding and blocks 1..l and returns e_l;
- `upper(e_l, l)` runs blocks l+1..L and the heads;
- `__call__(obs, intervention=f, layer=l)` does both with e_l <- f(e_l) in between, and returns
  every residual (for probes).
For rollouts, `init_cache` and `step` decode one time step at a time with a key/value cache,
giving the same outputs as the full forward pass (tested).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from hrl.models import encoders, heads

Intervention = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass
class TransformerConfig:
    """Paper grid model: 6 blocks, width 256, 4 heads of 64, MLP 512, 32 relative-position
    buckets, initialiser variance scale 0.1."""

    num_layers: int = 6
    width: int = 256
    num_heads: int = 4
    mlp_width: int = 512
    relpos_buckets: int = 32
    relpos_max_distance: int = 128  # distances beyond share the last bucket
    init_scale: float = 0.1  # variance scale of every kernel initialiser
    # Initial relative-position bias of head h: -slope * 4**-h per bucket (0: zeros). DECIDE (not
    # in the paper): see `initial_relpos_bias`.
    relpos_init_slope: float = 0.0
    max_len: int = 100  # longest sequence the cache holds (the horizon)
    encoder: str = "flat"  # how an observation becomes token features (hrl.models.encoders)
    # Add a learned vector per agent move since the previous observation (grid only; DECIDE, not
    # in the paper). Quick preset, seeds 0 / 1 / 2: 87.1 / 82.0 / 81.6% any-task against 80.1 /
    # 80.5 / 82.4% without: within the spread of seeds, so the preset leaves it off.
    embed_moves: bool = False

    def validate(self) -> None:
        for name in ("num_layers", "width", "num_heads", "mlp_width", "relpos_buckets", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.width % self.num_heads:
            raise ValueError(f"num_heads: must divide width={self.width}, got {self.num_heads}")
        if self.relpos_init_slope < 0:
            raise ValueError(f"relpos_init_slope: must be >= 0, got {self.relpos_init_slope}")
        if self.init_scale <= 0:
            raise ValueError(f"init_scale: must be > 0, got {self.init_scale}")
        if self.encoder not in encoders.ENCODERS:
            raise ValueError(f"encoder: must be one of {encoders.ENCODERS}, got {self.encoder!r}")


class Output(NamedTuple):
    action_params: jax.Array  # [..., model.action_dist.size]: logits, or Gaussian mean and log std
    obs_params: jax.Array  # [..., model.obs_dist.size]: the next observation's bit logits, or its mean
    residuals: jax.Array | None = None  # [L + 1, ..., width]: e_0 .. e_L (full forward only)


def relative_position_bucket(distance: jax.Array, num_buckets: int, max_distance: int) -> jax.Array:
    """Bucket of how far back a key is (distance = query - key >= 0): exact for the nearest half
    of the buckets, logarithmic beyond, as in T5's causal variant."""
    exact = num_buckets // 2
    log_scaled = exact + (
        jnp.log(jnp.maximum(distance, 1) / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    ).astype(jnp.int32)
    return jnp.where(distance < exact, distance, jnp.minimum(log_scaled, num_buckets - 1))


def initial_relpos_bias(cfg: TransformerConfig) -> jax.Array:
    """[buckets, heads]: a recency prior, steep in head 0 and flatter in each later head (as in
    ALiBi, Press et al. 2022, but learnable). The pinpad policy must recall the last colour it
    stood on, a few steps back, against the one visited a few steps earlier. Started at zero,
    the biases of the quick preset's model were still within 0.2 per step of flat after 16k
    updates and it confused the two; with slope 0 this is the paper's zero start."""
    slopes = cfg.relpos_init_slope * 4.0 ** -jnp.arange(cfg.num_heads)
    return -jnp.arange(cfg.relpos_buckets, dtype=jnp.float32)[:, None] * slopes


class Attention(nnx.Module):
    def __init__(self, cfg: TransformerConfig, init, rngs: nnx.Rngs):
        self.cfg = cfg
        self.qkv = nnx.Linear(cfg.width, 3 * cfg.width, kernel_init=init, rngs=rngs)
        self.out = nnx.Linear(cfg.width, cfg.width, kernel_init=init, rngs=rngs)
        self.relpos_bias = nnx.Param(initial_relpos_bias(cfg))

    def heads(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """[..., T, width] -> q, k, v each [..., T, heads, head_dim]."""
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        shape = x.shape[:-1] + (self.cfg.num_heads, self.cfg.width // self.cfg.num_heads)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)

    def attend(self, q, k, v, q_pos, k_pos, segments: jax.Array | None = None) -> jax.Array:
        """Queries at positions q_pos attend to keys at k_pos <= q_pos (of the same segment)."""
        distance = q_pos[:, None] - k_pos[None, :]
        bucket = relative_position_bucket(distance, self.cfg.relpos_buckets, self.cfg.relpos_max_distance)
        bias = jnp.moveaxis(self.relpos_bias[...][bucket], -1, 0)  # [heads, Tq, Tk]
        logits = jnp.einsum("...qhd,...khd->...hqk", q, k) / math.sqrt(q.shape[-1]) + bias
        visible = distance >= 0
        if segments is not None:
            visible = visible & (segments[..., None, :, None] == segments[..., None, None, :])
        logits = jnp.where(visible, logits, -jnp.inf)
        weights = jax.nn.softmax(logits, axis=-1)
        mixed = jnp.einsum("...hqk,...khd->...qhd", weights, v)
        return self.out(mixed.reshape(mixed.shape[:-2] + (self.cfg.width,)))

    def __call__(self, x: jax.Array, segments: jax.Array | None = None) -> jax.Array:
        positions = jnp.arange(x.shape[-2])
        return self.attend(*self.heads(x), positions, positions, segments)


class Block(nnx.Module):
    def __init__(self, cfg: TransformerConfig, init, rngs: nnx.Rngs):
        self.attention_norm = nnx.LayerNorm(cfg.width, rngs=rngs)
        self.attention = Attention(cfg, init, rngs)
        self.mlp_norm = nnx.LayerNorm(cfg.width, rngs=rngs)
        self.mlp_in = nnx.Linear(cfg.width, cfg.mlp_width, kernel_init=init, rngs=rngs)
        self.mlp_out = nnx.Linear(cfg.mlp_width, cfg.width, kernel_init=init, rngs=rngs)

    def mlp(self, x: jax.Array) -> jax.Array:
        return x + self.mlp_out(jax.nn.relu(self.mlp_in(self.mlp_norm(x))))

    def __call__(self, x: jax.Array, segments: jax.Array | None = None) -> jax.Array:
        return self.mlp(x + self.attention(self.attention_norm(x), segments))


class ResidualStreamModel(nnx.Module):
    """What every base model shares (this transformer, `hrl.models.hawk.Hawk`): the observation's
    linear embedding e_0, `num_layers` blocks that each map the residual stream [..., T, width]
    (with packed `segments`) to the next, and the heads on the normalised last residual, whose
    families are `action_dist` and `obs_dist` (`hrl.models.heads`)."""

    def _build(self, cfg, observation: heads.ObservationSpec, action: heads.ActionSpec, grid_shape, init, make_block,
               norm, rngs: nnx.Rngs, embed_moves: bool = False):
        """Creates the embedding, then the blocks (`make_block()` each), then the heads, then (with
        `embed_moves`) the move embedding: in this order, so that a given key gives the same
        parameters as before the backbones shared it, and as before the move embedding existed.
        `observation` and `action` are the environment's spaces (or, as before the heads module,
        the observation's size in bits and the number of discrete actions)."""
        self.cfg = cfg
        self.grid_shape = grid_shape
        self.obs_dist = heads.for_observations(observation)
        self.action_dist = heads.for_actions(action)
        obs_dim = self.obs_dist.obs_dim
        features = encoders.feature_dim(cfg.encoder, obs_dim, grid_shape)
        self.embedding = nnx.Linear(features, cfg.width, kernel_init=init, rngs=rngs)
        self.blocks = nnx.List([make_block() for _ in range(cfg.num_layers)])
        self.final_norm = norm(cfg.width, rngs=rngs)
        self.action_head = nnx.Linear(cfg.width, self.action_dist.size, kernel_init=init, rngs=rngs)
        self.obs_head = nnx.Linear(cfg.width, self.obs_dist.size, kernel_init=init, rngs=rngs)
        if embed_moves:
            encoders.require_grid(grid_shape)
        self.move_embedding = nnx.Param(init(rngs.params(), (encoders.NUM_MOVES, cfg.width))) if embed_moves else None

    @property
    def num_layers(self) -> int:
        return self.cfg.num_layers

    def embed(self, obs: jax.Array, segments: jax.Array | None = None) -> jax.Array:
        """obs [..., T, obs_dim] -> e_0 [..., T, width] (with `segments` for packed episodes; a
        model without `move_embedding` also takes a single obs [obs_dim])."""
        e = self.embed_observation(obs)
        if self.move_embedding is None:
            return e
        return e + self.move_embedding[...][encoders.agent_moves(obs, self.grid_shape, segments)]

    def embed_observation(self, obs: jax.Array) -> jax.Array:
        """The embedding of each observation on its own: obs [..., obs_dim] -> [..., width]."""
        return encoders.embed(self.cfg.encoder, obs, self.embedding.kernel[...], self.embedding.bias[...], self.grid_shape)

    def heads(self, e_last: jax.Array) -> Output:
        x = self.final_norm(e_last)
        return Output(self.action_head(x), self.obs_head(x))

    def __call__(
        self,
        obs: jax.Array,
        intervention: Intervention | None = None,
        layer: int | None = None,
        segments: jax.Array | None = None,
    ) -> Output:
        """Full causal forward over obs [..., T, obs_dim]; e_layer <- intervention(e_layer) if
        given. Returns the heads and every residual e_0 .. e_L.

        `segments` [..., T] (integers) packs several episodes into one sequence: a step sees only
        earlier steps of its own segment, so each episode's outputs are those it would have alone."""
        if intervention is not None and layer is None:
            raise ValueError("an intervention needs the layer it acts on")
        e = self.embed(obs, segments)
        residuals = []
        for index in range(self.num_layers + 1):
            if index == layer and intervention is not None:
                e = intervention(e)
            residuals.append(e)
            if index < self.num_layers:
                e = self.blocks[index](e, segments)
        return self.heads(e)._replace(residuals=jnp.stack(residuals))


    def step(
        self, cache: dict[str, jax.Array], obs: jax.Array, intervention: Intervention | None = None, layer: int | None = None
    ) -> tuple[Output, dict[str, jax.Array], jax.Array]:
        """One time step of incremental decoding: obs [obs_dim] (vmap for batches), e_layer <-
        intervention(e_layer) if given. Returns (heads' outputs, the updated cache, e_layer after
        the intervention; e_L if no layer). The backbone provides `init_cache`, `step_lower` and
        `step_upper`; the two halves let a caller read e_layer before deciding how to steer it."""
        if intervention is not None and layer is None:
            raise ValueError("an intervention needs the layer it acts on")
        layer = self.num_layers if layer is None else layer
        e, cache = self.step_lower(cache, obs, layer)
        if intervention is not None:
            e = intervention(e)
        out, cache = self.step_upper(cache, e, layer)
        return out, cache, e


class Transformer(ResidualStreamModel):
    def __init__(
        self,
        cfg: TransformerConfig,
        observation: heads.ObservationSpec,
        action: heads.ActionSpec,
        *,
        grid_shape: tuple[int, int, int] | None = None,
        rngs: nnx.Rngs,
    ):
        cfg.validate()
        init = nnx.initializers.variance_scaling(cfg.init_scale, "fan_in", "truncated_normal")
        self._build(cfg, observation, action, grid_shape, init, lambda: Block(cfg, init, rngs), nnx.LayerNorm, rngs,
                    embed_moves=cfg.embed_moves)

    def lower(self, obs: jax.Array, layer: int) -> jax.Array:
        """obs [..., T, obs_dim] -> e_layer [..., T, width]."""
        e = self.embed(obs)
        for block in self.blocks[:layer]:
            e = block(e)
        return e

    def upper(self, e: jax.Array, layer: int) -> Output:
        """e_layer [..., T, width] -> the heads' outputs."""
        for block in self.blocks[layer:]:
            e = block(e)
        return self.heads(e)

    # --- incremental decoding

    def init_cache(self, batch_shape: tuple[int, ...] = ()) -> dict[str, jax.Array]:
        """Empty key/value cache for `max_len` steps: k, v [*batch, L, max_len, heads, head_dim]
        (batch first, so that `step` vmaps with in_axes=0)."""
        head_dim = self.cfg.width // self.cfg.num_heads
        shape = (*batch_shape, self.num_layers, self.cfg.max_len, self.cfg.num_heads, head_dim)
        return {"k": jnp.zeros(shape), "v": jnp.zeros(shape), "t": jnp.zeros(batch_shape, jnp.int32),
                "cell": jnp.full(batch_shape, -1, jnp.int32)}  # the agent's previous cell (embed_moves)

    def step_lower(self, cache: dict[str, jax.Array], obs: jax.Array, layer: int) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The embedding and blocks 1..layer of one time step: obs [obs_dim] (vmap for batches) at
        position cache["t"] -> (e_layer [width], the cache with those blocks' keys and values)."""
        e = self.embed_observation(obs)
        if self.move_embedding is not None:
            cell = encoders.agent_cell(obs, self.grid_shape)
            e = e + self.move_embedding[...][encoders.move_between(cache["cell"], cell, self.grid_shape)]
            cache = {**cache, "cell": cell}
        return self._step_blocks(cache, e, 0, layer)

    def step_upper(self, cache: dict[str, jax.Array], e: jax.Array, layer: int) -> tuple[Output, dict[str, jax.Array]]:
        """Blocks layer+1..L and the heads of the step `step_lower` began; the cache moves on a step."""
        e, cache = self._step_blocks(cache, e, layer, self.num_layers)
        return self.heads(e), {**cache, "t": cache["t"] + 1}

    def _step_blocks(self, cache: dict[str, jax.Array], e: jax.Array, start: int, stop: int
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
        t = cache["t"]
        k_cache, v_cache = cache["k"], cache["v"]
        e = e[None]  # a sequence of one token
        positions = jnp.arange(self.cfg.max_len)
        for index in range(start, stop):
            block = self.blocks[index]
            q, k, v = block.attention.heads(block.attention_norm(e))
            k_cache = k_cache.at[index, t].set(k[0])
            v_cache = v_cache.at[index, t].set(v[0])
            attended = block.attention.attend(q, k_cache[index], v_cache[index], t[None], positions)
            e = block.mlp(e + attended)
        return e[0], {**cache, "k": k_cache, "v": v_cache}
