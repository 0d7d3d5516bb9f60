"""The metacontroller: reads the base model's residual stream at layer l, writes a linear controller back.

Per time step t of an episode (paper, phase 2; e_t is the unsteered residual e_{t,l}):
- history GRU (causal): h_t = GRU(e_t, h_{t-1}), h_0 = 0;
- sequence embedder (non-causal): a summary s of the whole episode e_{1:T} (DECIDE: one
  bidirectional GRU layer; s is a linear read-out of its two final states);
- encoder MLP: (e_t, h_{t-1}, s) -> mean and log-variance of a Gaussian proposal z~_t;
- switching unit (causal): beta_t = sigmoid(f(e_t, h_{t-1}, z_{t-1})) (DECIDE: f is an MLP with
  one ReLU hidden layer);
- temporal integration: z_t = beta_t z~_t + (1 - beta_t) z_{t-1}, z_0 = 0;
- decoder MLP: z_t -> U_t, of rank r (U = A B^T) or full; the steered residual is e_t + U_t e_t.

The last layer of the decoder's B (or of the full U) starts at zero, so U is exactly zero at the
start and the steered model is the base model. A is random, otherwise B would get no gradient.
The gate starts open and the proposals start narrow (`initial_switch_bias`,
`initial_log_variance`, DECIDE): with a half-shut gate and unit-variance proposals, the gate shut
for good within 500 updates in the quick preset, before the encoder had learnt anything.

Two implementations of the same recurrence, kept equal by a test: `__call__` runs a whole episode
(the history GRU in one scan, the encoder on every step at once, only the switching unit and the
integration in a sequential scan), and `step` runs one time step, the form later phases use when a
causal policy replaces the encoder.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from hrl.infra.config import check


@dataclasses.dataclass
class MetacontrollerConfig:
    """Paper sizes (grid): GRU 32, summary 32, z 8, encoder hidden 64, decoder hidden 32, rank 16."""

    latent_size: int = 8
    history_size: int = 32
    summary_size: int = 32
    encoder_hidden: int = 64
    switch_hidden: int = 32  # DECIDE: the paper does not size the switching unit
    decoder_hidden: int = 32
    rank: int | None = 16  # U = A B^T of this rank; 0 or None: a full width x width U (paper, ant)
    # DECIDE: the gate's initial bias; 2 starts it open (beta about 0.88). A gate that starts half
    # shut closed for good within 500 updates at every alpha, even 0: the untrained proposals are
    # noise, shutting them out helps at first, and a shut gate passes no gradient to the encoder.
    # Open at the start, it still shut at alpha 0.05 with 8x the batch (256 episodes: mean beta
    # 0.21 after 100 updates, 0.014 after 200, during the KL warm-up), and held fully open for the
    # first 300 updates it shut once released (at alpha > 0 the proposals had not yet lowered the
    # NLL below the base model's): one quick-preset run each, seed 0.
    initial_switch_bias: float = 2.0
    # DECIDE: the proposals' initial log-variance (the encoder's output bias). At 0 (unit noise)
    # the proposals are pure noise until the encoder has learnt to shrink them, and the gate
    # learns to shut them out first.
    initial_log_variance: float = -3.0
    # DECIDE (not in the paper): the scale of logistic noise added to the gate's logit in training
    # (discovery only; evaluation and the later phases use the noise-free gate). A gate value
    # between 0 and 1 then lets a random share of each proposal through, so information passes
    # reliably only where the gate is firmly shut or open: it pushes beta towards 0 or 1. Quick
    # preset, seed 0, alpha 0.3: 16% of beta in (0.1, 0.9) with noise 1 against 56% without; with
    # noise 2 the gate stayed open at every step at alpha 0.3 (docs/gridworld_findings.md, "Discovery").
    switch_noise: float = 0.0
    # DECIDE (the paper's read-out of its non-causal embedder is not given): False, one summary of
    # the whole episode from the two directions' final states; True, one per step from the two
    # directions' states at that step, so the proposal at t sees most readily what comes next.
    # Quick preset, seed 0, with `discovery.labels=expert`: switch F1 1.00 at alphas 0.05-0.3 per
    # step, 0 at every alpha with one summary per episode.
    summary_per_step: bool = False

    def validate(self) -> None:
        for name in ("latent_size", "history_size", "summary_size", "encoder_hidden", "switch_hidden",
                     "decoder_hidden"):
            check(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        check(self.rank is None or self.rank >= 0, "rank", "must be >= 0 (0: full matrix)", self.rank)
        check(self.switch_noise >= 0, "switch_noise", "must be >= 0", self.switch_noise)


class Sequence(NamedTuple):
    """The metacontroller's pass over one episode; every array has the time axis first."""

    z: jax.Array  # [T, latent] integrated latent, what the decoder reads
    beta: jax.Array  # [T] switching gate
    mean: jax.Array  # [T, latent] proposal mean
    log_var: jax.Array  # [T, latent] proposal log-variance


class Carry(NamedTuple):
    history: jax.Array  # h_{t-1}
    z: jax.Array  # z_{t-1}


def gaussian_kl(mean: jax.Array, log_var: jax.Array) -> jax.Array:
    """KL(N(mean, diag(exp(log_var))) || N(0, I)), summed over the last axis."""
    return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(log_var) - log_var - 1.0, axis=-1)


class MLP(nnx.Module):
    """One ReLU hidden layer."""

    def __init__(self, sizes: tuple[int, int, int], rngs: nnx.Rngs):
        self.hidden = nnx.Linear(sizes[0], sizes[1], rngs=rngs)
        self.out = nnx.Linear(sizes[1], sizes[2], rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jax.nn.relu(self.hidden(x)))


class Metacontroller(nnx.Module):
    def __init__(self, cfg: MetacontrollerConfig, width: int, *, rngs: nnx.Rngs, always_switch: bool = False):
        cfg.validate()
        self.cfg = cfg
        self.width = width
        self.always_switch = always_switch  # the beta = 1 ablation: a new z at every step
        latent, history, summary = cfg.latent_size, cfg.history_size, cfg.summary_size
        self.history = nnx.GRUCell(width, history, rngs=rngs)
        self.summary_forward = nnx.GRUCell(width, summary, rngs=rngs)
        self.summary_backward = nnx.GRUCell(width, summary, rngs=rngs)
        self.summary_readout = nnx.Linear(2 * summary, summary, rngs=rngs)
        self.encoder = MLP((width + history + summary, cfg.encoder_hidden, 2 * latent), rngs)
        self.switch = MLP((width + history + latent, cfg.switch_hidden, 1), rngs)
        self.switch.out.bias[...] = jnp.full((1,), cfg.initial_switch_bias, jnp.float32)  # not weakly typed: a retrace
        self.encoder.out.bias[...] = jnp.zeros(2 * latent).at[latent:].set(cfg.initial_log_variance)
        self.decoder_hidden = nnx.Linear(latent, cfg.decoder_hidden, rngs=rngs)
        if cfg.rank:
            self.decoder_a = nnx.Linear(cfg.decoder_hidden, width * cfg.rank, rngs=rngs)
            self.decoder_b = nnx.Linear(cfg.decoder_hidden, width * cfg.rank, kernel_init=nnx.initializers.zeros_init(),
                                        rngs=rngs)
        else:
            self.decoder_a = None
            self.decoder_b = nnx.Linear(cfg.decoder_hidden, width * width, kernel_init=nnx.initializers.zeros_init(),
                                        rngs=rngs)

    # --- the pieces

    def summarize(self, e: jax.Array, mask: jax.Array) -> jax.Array:
        """e [T, width], mask [T] -> s: a bidirectional GRU over the episode's steps, read out from
        its two final states (s [summary]) or, with `summary_per_step`, at every step from the
        forward state after e_1..e_t and the backward state after e_T..e_t (s [T, summary])."""

        def run(cell, inputs, valid):
            def step(h, x):
                new, _ = cell(h, x[0])
                h = jnp.where(x[1], new, h)
                return h, h
            return jax.lax.scan(step, jnp.zeros(cell.hidden_features), (inputs, valid))

        forward, forward_states = run(self.summary_forward, e, mask)
        backward, backward_states = run(self.summary_backward, e[::-1], mask[::-1])  # padding comes first: h stays 0
        if self.cfg.summary_per_step:
            return self.summary_readout(jnp.concatenate([forward_states, backward_states[::-1]], axis=-1))
        return self.summary_readout(jnp.concatenate([forward, backward]))

    def propose(self, e: jax.Array, history: jax.Array, summary: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Mean and log-variance of the proposal z~_t."""
        summary = jnp.broadcast_to(summary, e.shape[:-1] + summary.shape[-1:])
        mean, log_var = jnp.split(self.encoder(jnp.concatenate([e, history, summary], -1)), 2, axis=-1)
        return mean, log_var

    def gate(self, e: jax.Array, history: jax.Array, z_previous: jax.Array, noise: jax.Array | float = 0.0) -> jax.Array:
        """beta_t; `noise` is added to its logit (`switch_noise`)."""
        if self.always_switch:
            return jnp.ones(e.shape[:-1])
        return jax.nn.sigmoid(self.switch(jnp.concatenate([e, history, z_previous], -1))[..., 0] + noise)

    def decoder_weights(self, layer: nnx.Linear, inner: int) -> jax.Array:
        """A decoder output layer as [hidden + 1, width, inner] (its bias as the last row): the
        output for decoder hidden units h is sum_k [h, 1]_k W[k]."""
        weights = jnp.concatenate([layer.kernel[...], layer.bias[...][None]])
        return weights.reshape(-1, self.width, inner)

    def hidden_with_one(self, z: jax.Array) -> jax.Array:
        hidden = jax.nn.relu(self.decoder_hidden(z))
        return jnp.concatenate([hidden, jnp.ones_like(hidden[..., :1])], axis=-1)

    def controller(self, z: jax.Array) -> jax.Array:
        """U(z) as a matrix [..., width, width] (for analysis; `steer` never forms it)."""
        hidden = self.hidden_with_one(z)
        if self.decoder_a is None:
            return jnp.einsum("...k,kvw->...vw", hidden, self.decoder_weights(self.decoder_b, self.width))
        a = jnp.einsum("...k,kvr->...vr", hidden, self.decoder_weights(self.decoder_a, self.cfg.rank))
        b = jnp.einsum("...k,kwr->...wr", hidden, self.decoder_weights(self.decoder_b, self.cfg.rank))
        return jnp.einsum("...vr,...wr->...vw", a, b)

    def steer(self, e: jax.Array, z: jax.Array) -> jax.Array:
        """e + U(z) e, per step: e [..., width], z [..., latent].

        Each step's A, B (or U) is a combination of the output layer's rows W_k weighted by the
        decoder's hidden units h_k (and a bias row, h = 1). The products are regrouped into
        plain matmuls with intermediates of size (hidden + 1) x rank per step, without forming
        any step's matrix: per-step matrix products made the update several times slower on a
        CPU. B^T e = sum_k h_k (W^B_k)^T e: one matmul of e with every W^B_k, then the weighted
        sum; A r = sum_{k,j} (h_k r_j) W^A_kj: the outer product h r^T times the stacked W^A."""
        hidden = self.hidden_with_one(z)
        if self.decoder_a is None:
            return e + self.combine(hidden, e, self.decoder_weights(self.decoder_b, self.width))
        read = self.weighted_reads(hidden, e, self.decoder_weights(self.decoder_b, self.cfg.rank))  # B^T e
        return e + self.combine(hidden, read, self.decoder_weights(self.decoder_a, self.cfg.rank))

    @staticmethod
    def weighted_reads(hidden: jax.Array, e: jax.Array, weights: jax.Array) -> jax.Array:
        """sum_k h_k W_k^T e for weights [k, width, r]."""
        reads = (e @ jnp.moveaxis(weights, 0, 1).reshape(e.shape[-1], -1)).reshape(*e.shape[:-1], *weights.shape[::2])
        return jnp.sum(hidden[..., None] * reads, axis=-2)

    @staticmethod
    def combine(hidden: jax.Array, x: jax.Array, weights: jax.Array) -> jax.Array:
        """sum_k h_k W_k x for weights [k, out, in]."""
        outer = (hidden[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], -1)  # [..., k * in]
        return outer @ jnp.swapaxes(weights, 1, 2).reshape(outer.shape[-1], weights.shape[1])

    # --- a whole episode, and one step

    def __call__(self, e: jax.Array, mask: jax.Array, noise: jax.Array, gate_noise: jax.Array | None = None) -> Sequence:
        """e [T, width] (unsteered residuals at the controlled layer), mask [T] (the steps that
        happened), noise [T, latent] (standard normal; zeros: the proposal means), gate_noise [T]
        (added to the gate's logits; None: none). vmap for batches."""
        _, histories = jax.lax.scan(lambda h, x: (self.history(h, x)[0],) * 2, jnp.zeros(self.cfg.history_size), e)
        previous_history = jnp.concatenate([jnp.zeros((1, self.cfg.history_size)), histories[:-1]])
        mean, log_var = self.propose(e, previous_history, self.summarize(e, mask))
        proposal = mean + jnp.exp(0.5 * log_var) * noise

        def integrate(z_previous, inputs):
            e_t, h_t, proposal_t, gate_noise_t = inputs
            beta = self.gate(e_t, h_t, z_previous, gate_noise_t)
            z = beta * proposal_t + (1.0 - beta) * z_previous
            return z, (z, beta)

        gate_noise = jnp.zeros(e.shape[:1]) if gate_noise is None else gate_noise
        _, (z, beta) = jax.lax.scan(integrate, jnp.zeros(self.cfg.latent_size), (e, previous_history, proposal, gate_noise))
        return Sequence(z, beta, mean, log_var)

    def init_carry(self) -> Carry:
        return Carry(jnp.zeros(self.cfg.history_size), jnp.zeros(self.cfg.latent_size))

    def step(self, carry: Carry, e: jax.Array, proposal: jax.Array) -> tuple[Carry, jax.Array, jax.Array]:
        """One step given the proposal z~_t (from the encoder, or later from a causal policy):
        returns (next carry, z_t, beta_t)."""
        beta = self.gate(e, carry.history, carry.z)
        z = beta * proposal + (1.0 - beta) * carry.z
        history, _ = self.history(carry.history, e)
        return Carry(history, z), z, beta
