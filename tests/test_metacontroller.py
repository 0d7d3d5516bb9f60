"""The metacontroller's recurrence, gate, KL and decoder, on random inputs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hrl.models.metacontroller import Metacontroller, MetacontrollerConfig, gaussian_kl

WIDTH, STEPS = 12, 9
CFG = MetacontrollerConfig(latent_size=3, history_size=5, summary_size=4, encoder_hidden=6, switch_hidden=7,
                           decoder_hidden=8, rank=2)


def make(seed=0, cfg=CFG, **kwargs):
    return Metacontroller(cfg, WIDTH, rngs=nnx.Rngs(params=seed), **kwargs)


def episode(seed=1, length=6):
    e_key, noise_key = jax.random.split(jax.random.key(seed))
    e = jax.random.normal(e_key, (STEPS, WIDTH))
    return e, jnp.arange(STEPS) < length, jax.random.normal(noise_key, (STEPS, CFG.latent_size))


@pytest.mark.parametrize("summary_per_step", [False, True])
def test_the_episode_scan_equals_a_step_by_step_reference(summary_per_step):
    meta = make(cfg=dataclasses.replace(CFG, summary_per_step=summary_per_step))
    e, mask, noise = episode()
    sequence = meta(e, mask, noise)
    summary = meta.summarize(e, mask)
    assert summary.shape == ((STEPS, CFG.summary_size) if summary_per_step else (CFG.summary_size,))
    carry = meta.init_carry()
    for t in range(STEPS):
        mean, log_var = meta.propose(e[t], carry.history, summary[t] if summary_per_step else summary)
        carry, z, beta = meta.step(carry, e[t], mean + jnp.exp(0.5 * log_var) * noise[t])
        np.testing.assert_allclose(sequence.mean[t], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sequence.log_var[t], log_var, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sequence.beta[t], beta, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sequence.z[t], z, rtol=1e-5, atol=1e-6)
    # The gate is neither stuck at 0 nor 1 here, so the test exercises the integration.
    assert 0.05 < float(sequence.beta.min()) and float(sequence.beta.max()) < 0.95


def test_with_beta_one_the_integrated_latent_is_the_proposal():
    meta = make(always_switch=True)
    e, mask, noise = episode()
    sequence = meta(e, mask, noise)
    np.testing.assert_array_equal(sequence.beta, np.ones(STEPS))
    np.testing.assert_array_equal(sequence.z, sequence.mean + jnp.exp(0.5 * sequence.log_var) * noise)


def test_gate_noise_shifts_the_gates_logit():
    meta = make()
    e, mask, noise = episode()
    sequence = meta(e, mask, noise)
    logit = jnp.log(sequence.beta) - jnp.log1p(-sequence.beta)
    shifted = meta(e, mask, noise, gate_noise=jnp.full(STEPS, 1.5))
    # At t = 0 the gate's inputs are the same (z_0 = 0); later z, and so the gate, differ.
    np.testing.assert_allclose(jnp.log(shifted.beta[0]) - jnp.log1p(-shifted.beta[0]), logit[0] + 1.5, rtol=1e-4)
    open_gate = meta(e, mask, noise, gate_noise=jnp.full(STEPS, 50.0))  # beta = 1: z is each step's proposal
    np.testing.assert_allclose(open_gate.z, open_gate.mean + jnp.exp(0.5 * open_gate.log_var) * noise, rtol=1e-5)


@pytest.mark.parametrize("summary_per_step", [False, True])
def test_the_summary_ignores_padding_and_sees_the_whole_episode(summary_per_step):
    meta = make(cfg=dataclasses.replace(CFG, summary_per_step=summary_per_step))
    e, mask, _ = episode(length=6)
    changed_padding = e.at[7].set(100.0)
    summary = meta.summarize(e, mask)
    np.testing.assert_array_equal(summary, meta.summarize(changed_padding, mask))
    changed_last_step = meta.summarize(e.at[5].add(1.0), mask)  # non-causal: a late step changes the summary
    first = (lambda s: s[0]) if summary_per_step else (lambda s: s)  # per step: already the first step's
    assert not np.allclose(first(summary), first(changed_last_step))


def test_kl_matches_the_closed_form_and_a_monte_carlo_estimate():
    mean = jnp.array([0.3, -1.2, 0.0])
    log_var = jnp.array([-0.5, 0.4, 0.0])
    kl = float(gaussian_kl(mean, log_var))
    # Closed form of KL(N(m, S) || N(0, I)) with full matrices: (tr S + m'm - k - log det S) / 2.
    cov = np.diag(np.exp(np.asarray(log_var, np.float64)))
    m = np.asarray(mean, np.float64)
    closed = 0.5 * (np.trace(cov) + m @ m - 3 - np.log(np.linalg.det(cov)))
    assert kl == pytest.approx(closed, rel=1e-5)
    # E_q[log q(z) - log p(z)] by sampling.
    z = m + np.sqrt(np.diag(cov)) * np.random.default_rng(0).standard_normal((400_000, 3))
    log_q = -0.5 * np.sum((z - m) ** 2 / np.diag(cov) + np.log(2 * np.pi * np.diag(cov)), axis=1)
    log_p = -0.5 * np.sum(z**2 + np.log(2 * np.pi), axis=1)
    assert np.mean(log_q - log_p) == pytest.approx(closed, abs=0.01)
    assert float(gaussian_kl(jnp.zeros(3), jnp.zeros(3))) == 0.0


@pytest.mark.parametrize("rank", [2, 0])
def test_the_decoder_starts_at_a_zero_controller_and_can_leave_it(rank):
    meta = Metacontroller(MetacontrollerConfig(latent_size=3, rank=rank), WIDTH, rngs=nnx.Rngs(params=0))
    e = jax.random.normal(jax.random.key(3), (4, WIDTH))
    z = jax.random.normal(jax.random.key(4), (4, 3))
    np.testing.assert_array_equal(meta.steer(e, z), e)  # bitwise: the steered model is the base model
    grads = nnx.grad(lambda m: jnp.sum(m.steer(e, z) ** 2))(meta)
    assert float(jnp.abs(grads.decoder_b.kernel[...]).max()) > 0  # U = 0 is not a stationary point


@pytest.mark.parametrize("rank", [2, 0])
def test_steering_applies_the_decoded_controller_matrix(rank):
    meta = Metacontroller(MetacontrollerConfig(latent_size=3, rank=rank), WIDTH, rngs=nnx.Rngs(params=0))
    kernel = meta.decoder_b.kernel
    kernel[...] = jax.random.normal(jax.random.key(7), kernel.shape)  # a nonzero U
    e = jax.random.normal(jax.random.key(3), (5, WIDTH))
    z = jax.random.normal(jax.random.key(4), (5, 3))
    u = meta.controller(z)
    assert u.shape == (5, WIDTH, WIDTH) and float(jnp.abs(u).max()) > 0.1
    if rank:
        assert int(np.linalg.matrix_rank(np.asarray(u[0]))) == rank
    np.testing.assert_allclose(meta.steer(e, z), e + jnp.einsum("tvw,tw->tv", u, e), rtol=1e-4, atol=1e-4)
