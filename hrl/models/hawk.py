"""Hawk: a recurrent sequence model of RG-LRU blocks (De et al. 2024, "Griffin"), with the
transformer's interface (`hrl.models.transformer`), so that every stage runs on either backbone.

A residual block is
    x <- x + temporal_mix(RMSNorm(x)),   x <- x + gated_mlp(RMSNorm(x)).
The temporal mixing block has two branches of width `rnn_width`: GeLU(W_g x), and W_x x through a
causal depthwise convolution over the last `conv_width` steps and then the Real-Gated Linear
Recurrent Unit; their product is projected back to `width`. The RG-LRU, per channel:
    r_t = sigmoid(W_a u_t + b_a)            recurrence gate
    i_t = sigmoid(W_i u_t + b_i)            input gate
    a_t = sigmoid(Lambda) ** (c r_t)        c = 8, computed in log space
    h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t u_t)
with sigmoid(Lambda) ** c initialised uniformly in [0.9, 0.999], as in the paper. The gates are
dense maps here (Griffin: block-diagonal per head; DECIDE: dense at these widths costs little and
needs no head count). The gated MLP is GeLU(W_1 x) * (W_2 x) -> W_3.

Over a whole sequence the linear recurrence runs as `lax.associative_scan` (log-depth); `step`
carries h and the convolution's last inputs per block, so a rollout costs one step per env step.
The residual stream, the split into `lower` / `upper`, interventions and packed `segments` mean
exactly what they mean for the transformer (a segment start resets the recurrence and the
convolution's window).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from hrl.models import encoders
from hrl.models.heads import ActionSpec, ObservationSpec
from hrl.models.transformer import Output, ResidualStreamModel

GATE_EXPONENT = 8.0  # c in a_t = a ** (c r_t)


@dataclasses.dataclass
class HawkConfig:
    """Paper (ant): 8 blocks, width 256, MLP 512."""

    num_layers: int = 8
    width: int = 256
    rnn_width: int = 256  # Griffin: about 4/3 of width; the paper's ant model does not say
    mlp_width: int = 512
    conv_width: int = 4  # Griffin's temporal convolution
    init_scale: float = 0.1  # variance scale of every kernel initialiser (as the transformer)
    max_len: int = 500  # the horizon; a recurrent state has no length limit, kept for the interface
    encoder: str = "flat"

    def validate(self) -> None:
        for name in ("num_layers", "width", "rnn_width", "mlp_width", "conv_width", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.init_scale <= 0:
            raise ValueError(f"init_scale: must be > 0, got {self.init_scale}")
        if self.encoder not in encoders.ENCODERS:
            raise ValueError(f"encoder: must be one of {encoders.ENCODERS}, got {self.encoder!r}")


def initial_log_decay_rate(key: jax.Array, size: int) -> jax.Array:
    """Lambda such that sigmoid(Lambda) ** c is uniform in [0.9, 0.999]."""
    a_to_c = jax.random.uniform(key, (size,), minval=0.9, maxval=0.999)
    a = a_to_c ** (1.0 / GATE_EXPONENT)
    return jnp.log(a) - jnp.log1p(-a)


class RGLRU(nnx.Module):
    def __init__(self, size: int, init, rngs: nnx.Rngs):
        self.recurrence_gate = nnx.Linear(size, size, kernel_init=init, rngs=rngs)
        self.input_gate = nnx.Linear(size, size, kernel_init=init, rngs=rngs)
        self.log_decay_rate = nnx.Param(initial_log_decay_rate(rngs.params(), size))

    def coefficients(self, u: jax.Array) -> tuple[jax.Array, jax.Array]:
        """h_t = a_t h_{t-1} + b_t: returns (a_t, b_t) for inputs u [..., size]."""
        r = jax.nn.sigmoid(self.recurrence_gate(u))
        i = jax.nn.sigmoid(self.input_gate(u))
        log_a = -GATE_EXPONENT * r * jax.nn.softplus(-self.log_decay_rate[...])
        a = jnp.exp(log_a)
        # sqrt(1 - a^2) from log a: -expm1(2 log a) stays accurate when a is close to 1.
        return a, jnp.sqrt(-jnp.expm1(2 * log_a)) * (i * u)

    def __call__(self, u: jax.Array, starts: jax.Array) -> jax.Array:
        """u [..., T, size]; starts [..., T] bool: the recurrence restarts there (h_{t-1} = 0)."""
        a, b = self.coefficients(u)
        a = jnp.where(starts[..., None], 0.0, a)

        def combine(earlier, later):
            a1, b1 = earlier
            a2, b2 = later
            return a1 * a2, a2 * b1 + b2

        return jax.lax.associative_scan(combine, (a, b), axis=-2)[1]

    def step(self, h: jax.Array, u: jax.Array) -> jax.Array:
        a, b = self.coefficients(u)
        return a * h + b


class TemporalConv(nnx.Module):
    """Causal depthwise convolution over time: y_t = sum_k w_k * x_{t-k} + bias."""

    def __init__(self, size: int, width: int, rngs: nnx.Rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (width, size)) / jnp.sqrt(width))
        self.bias = nnx.Param(jnp.zeros(size))

    def __call__(self, x: jax.Array, segments: jax.Array) -> jax.Array:
        """x [..., T, size]; segments [..., T]: a step sees only earlier inputs of its segment."""
        out = x * self.kernel[0]
        for k in range(1, self.kernel.shape[0]):
            shifted = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(k, 0), (0, 0)])[..., :-k, :]
            shifted_segment = jnp.pad(segments, [(0, 0)] * (segments.ndim - 1) + [(k, 0)], constant_values=-1)[..., :-k]
            out = out + jnp.where((shifted_segment == segments)[..., None], shifted, 0.0) * self.kernel[k]
        return out + self.bias[...]

    def step(self, window: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """window [conv_width - 1, size]: the previous inputs, most recent first."""
        out = x * self.kernel[0] + jnp.einsum("kd,kd->d", window, self.kernel[1:]) + self.bias[...]
        return out, jnp.concatenate([x[None], window[:-1]])


class RecurrentBlock(nnx.Module):
    def __init__(self, cfg: HawkConfig, init, rngs: nnx.Rngs):
        self.mix_norm = nnx.RMSNorm(cfg.width, rngs=rngs)
        self.gate_branch = nnx.Linear(cfg.width, cfg.rnn_width, kernel_init=init, rngs=rngs)
        self.recurrent_branch = nnx.Linear(cfg.width, cfg.rnn_width, kernel_init=init, rngs=rngs)
        self.conv = TemporalConv(cfg.rnn_width, cfg.conv_width, rngs)
        self.rg_lru = RGLRU(cfg.rnn_width, init, rngs)
        self.mix_out = nnx.Linear(cfg.rnn_width, cfg.width, kernel_init=init, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(cfg.width, rngs=rngs)
        self.mlp_gate = nnx.Linear(cfg.width, cfg.mlp_width, kernel_init=init, rngs=rngs)
        self.mlp_in = nnx.Linear(cfg.width, cfg.mlp_width, kernel_init=init, rngs=rngs)
        self.mlp_out = nnx.Linear(cfg.mlp_width, cfg.width, kernel_init=init, rngs=rngs)

    def mlp(self, x: jax.Array) -> jax.Array:
        y = self.mlp_norm(x)
        return x + self.mlp_out(jax.nn.gelu(self.mlp_gate(y)) * self.mlp_in(y))

    def __call__(self, x: jax.Array, segments: jax.Array | None = None) -> jax.Array:
        segments = _single_segment(x) if segments is None else segments
        y = self.mix_norm(x)
        starts = segments != jnp.pad(segments, [(0, 0)] * (segments.ndim - 1) + [(1, 0)], constant_values=-1)[..., :-1]
        recurrent = self.rg_lru(self.conv(self.recurrent_branch(y), segments), starts)
        return self.mlp(x + self.mix_out(jax.nn.gelu(self.gate_branch(y)) * recurrent))

    def step(self, carry: tuple[jax.Array, jax.Array], x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        h, window = carry
        y = self.mix_norm(x)
        u, window = self.conv.step(window, self.recurrent_branch(y))
        h = self.rg_lru.step(h, u)
        return self.mlp(x + self.mix_out(jax.nn.gelu(self.gate_branch(y)) * h)), (h, window)


class Hawk(ResidualStreamModel):
    def __init__(
        self,
        cfg: HawkConfig,
        observation: ObservationSpec,
        action: ActionSpec,
        *,
        grid_shape: tuple[int, int, int] | None = None,
        rngs: nnx.Rngs,
    ):
        cfg.validate()
        init = nnx.initializers.variance_scaling(cfg.init_scale, "fan_in", "truncated_normal")
        self._build(cfg, observation, action, grid_shape, init, lambda: RecurrentBlock(cfg, init, rngs), nnx.RMSNorm,
                    rngs)

    def lower(self, obs: jax.Array, layer: int, segments: jax.Array | None = None) -> jax.Array:
        e = self.embed(obs)
        for block in self.blocks[:layer]:
            e = block(e, segments)
        return e

    def upper(self, e: jax.Array, layer: int, segments: jax.Array | None = None) -> Output:
        for block in self.blocks[layer:]:
            e = block(e, segments)
        return self.heads(e)

    # --- step-by-step decoding

    def init_cache(self, batch_shape: tuple[int, ...] = ()) -> dict[str, jax.Array]:
        """The recurrent state: h [*batch, L, rnn_width] and each block's convolution window
        [*batch, L, conv_width - 1, rnn_width], zeros (a fresh episode)."""
        cfg = self.cfg
        return {
            "h": jnp.zeros((*batch_shape, cfg.num_layers, cfg.rnn_width)),
            "conv": jnp.zeros((*batch_shape, cfg.num_layers, cfg.conv_width - 1, cfg.rnn_width)),
            "t": jnp.zeros(batch_shape, jnp.int32),
        }

    def step_lower(self, cache: dict[str, jax.Array], obs: jax.Array, layer: int) -> tuple[jax.Array, dict[str, jax.Array]]:
        """As `Transformer.step_lower`: one observation [obs_dim] (vmap for batches)."""
        return self._step_blocks(cache, self.embed(obs), 0, layer)

    def step_upper(self, cache: dict[str, jax.Array], e: jax.Array, layer: int) -> tuple[Output, dict[str, jax.Array]]:
        e, cache = self._step_blocks(cache, e, layer, self.num_layers)
        return self.heads(e), {**cache, "t": cache["t"] + 1}

    def _step_blocks(self, cache: dict[str, jax.Array], e: jax.Array, start: int, stop: int
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
        hs, windows = cache["h"], cache["conv"]
        for index in range(start, stop):
            e, (h, window) = self.blocks[index].step((hs[index], windows[index]), e)
            hs, windows = hs.at[index].set(h), windows.at[index].set(window)
        return e, {"h": hs, "conv": windows, "t": cache["t"]}


def _single_segment(e: jax.Array) -> jax.Array:
    return jnp.zeros(e.shape[:-1], jnp.int32)
