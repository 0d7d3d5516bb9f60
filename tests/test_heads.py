"""The base model's heads: the family follows the space, and every quantity matches its closed form
on hand-made numbers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from envs.base import Box, Discrete
from hrl.models import heads
from hrl.models.heads import Bernoulli, Categorical, DiagGaussian, UnitGaussian

LOG_2PI = math.log(2 * math.pi)


def test_the_family_follows_the_environments_spaces():
    grid, ant = envs.make("GridPinpad-v0"), envs.make("AntPinpad-v0")
    assert heads.for_actions(grid.action_space) == Categorical(4)
    assert heads.for_observations(grid.observation_space) == Bernoulli(637)
    assert heads.for_actions(ant.action_space) == DiagGaussian(8)
    assert heads.for_observations(ant.observation_space) == UnitGaussian(41)
    assert heads.for_actions(4) == Categorical(4) and heads.for_observations(637) == Bernoulli(637)  # the old ints
    assert heads.for_actions(DiagGaussian(3)) == DiagGaussian(3)
    assert DiagGaussian(8).size == 16 and Categorical(4).size == 4 and UnitGaussian(41).size == 41
    with pytest.raises(ValueError, match="action head"):
        heads.for_actions(Box(-1.0, 1.0, (2, 3)))
    with pytest.raises(ValueError, match="observation head"):
        heads.for_observations(Box(0, 5, (7,), jnp.int32))  # integers, but not bits
    assert heads.for_actions(Discrete(5)) == Categorical(5)


def test_categorical_against_closed_forms():
    dist = Categorical(3)
    logits = jnp.array([1.0, 2.0, 3.0])
    log_normaliser = math.log(math.e + math.e**2 + math.e**3)
    np.testing.assert_allclose(dist.log_prob(logits, jnp.array(1)), 2.0 - log_normaliser, rtol=1e-6)
    np.testing.assert_allclose(dist.nll(logits, jnp.array(1)), log_normaliser - 2.0, rtol=1e-6)
    assert int(dist.mode(logits)) == 2
    np.testing.assert_allclose(Categorical(4).entropy(jnp.zeros(4)), math.log(4), rtol=1e-6)
    # KL((1/2, 1/2) || (1/4, 3/4)) = 1/2 log 2 + 1/2 log(2/3)
    kl = Categorical(2).kl(jnp.zeros(2), jnp.array([0.0, math.log(3.0)]))
    np.testing.assert_allclose(kl, 0.5 * math.log(2) + 0.5 * math.log(2 / 3), rtol=1e-5)
    np.testing.assert_allclose(dist.kl(logits, logits), 0.0, atol=1e-7)
    # Soft targets: the cross-entropy to (1/2, 1/2, 0) of a uniform p is log 3; the fit asks
    # whether the target allows the most likely action.
    np.testing.assert_allclose(dist.target_nll(jnp.zeros(3), jnp.array([0.5, 0.5, 0.0])), math.log(3), rtol=1e-6)
    assert not dist.target_fit(jnp.array([0.0, 1.0, 0.0]), jnp.array([0.5, 0.0, 0.5]))
    assert dist.target_fit(jnp.array([0.0, 1.0, 0.0]), dist.targets(jnp.array(1)))
    np.testing.assert_array_equal(dist.targets(jnp.array([2, 0])), [[0, 0, 1], [1, 0, 0]])
    batch = jax.random.normal(jax.random.key(0), (5, 3))
    actions = jnp.array([0, 1, 2, 1, 0])
    np.testing.assert_allclose(dist.nll(batch, actions), -dist.log_prob(batch, actions), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(dist.fit(batch, actions), jnp.argmax(batch, -1) == actions)


def test_diagonal_gaussian_against_closed_forms():
    dist = DiagGaussian(2)
    # mean (1, 0), std (2, 1); action (3, 0.5)
    params = jnp.array([1.0, 0.0, math.log(2.0), 0.0])
    expected = (-0.5 * 1.0**2 - math.log(2.0) - 0.5 * LOG_2PI) + (-0.5 * 0.5**2 - 0.5 * LOG_2PI)
    np.testing.assert_allclose(dist.log_prob(params, jnp.array([3.0, 0.5])), expected, rtol=1e-6)
    np.testing.assert_allclose(dist.nll(params, jnp.array([3.0, 0.5])), -expected, rtol=1e-6)
    np.testing.assert_array_equal(dist.mode(params), [1.0, 0.0])
    np.testing.assert_allclose(dist.entropy(params), math.log(2.0) + LOG_2PI + 1.0, rtol=1e-6)  # sum 0.5 log(2 pi e var)
    # KL(N(0, 1) || N(1, 2^2)) per component: log 2 + (1 + 1) / 8 - 1/2; the second component is equal.
    p = jnp.array([0.0, 5.0, 0.0, -1.0])
    q = jnp.array([1.0, 5.0, math.log(2.0), -1.0])
    np.testing.assert_allclose(dist.kl(p, q), math.log(2.0) + 0.25 - 0.5, rtol=1e-6)
    np.testing.assert_allclose(dist.kl(q, q), 0.0, atol=1e-7)
    # The fit: the mean's squared error to the target, averaged over the components.
    np.testing.assert_allclose(dist.target_fit(params, jnp.array([3.0, 1.0])), (4.0 + 1.0) / 2, rtol=1e-6)
    np.testing.assert_allclose(dist.fit(params, jnp.array([3.0, 1.0])), 2.5, rtol=1e-6)


def test_gaussian_log_std_is_clipped_and_samples_follow_the_distribution():
    dist = DiagGaussian(2)
    _, log_std = dist.mean_and_log_std(jnp.array([0.0, 0.0, 10.0, -10.0]))
    np.testing.assert_array_equal(log_std, [heads.LOG_STD_MAX, heads.LOG_STD_MIN])
    params = jnp.array([0.5, -1.0, math.log(0.3), math.log(2.0)])
    samples = jax.vmap(lambda k: dist.sample(params, k))(jax.random.split(jax.random.key(0), 20000))
    np.testing.assert_allclose(samples.mean(0), [0.5, -1.0], atol=0.05)
    np.testing.assert_allclose(samples.std(0), [0.3, 2.0], rtol=0.03)


def test_observation_heads_against_closed_forms():
    # Bits (1, 0) under probabilities (1/2, 3/4): -log(1/2) - log(1/4) = log 8.
    np.testing.assert_allclose(Bernoulli(2).nll(jnp.array([0.0, math.log(3.0)]), jnp.array([1, 0], jnp.uint8)),
                               math.log(8.0), rtol=1e-6)
    # N(obs; mean, I): half the squared error plus half log 2 pi per feature.
    np.testing.assert_allclose(UnitGaussian(2).nll(jnp.array([0.0, 1.0]), jnp.array([1.0, 1.0])), 0.5 + LOG_2PI,
                               rtol=1e-6)
    np.testing.assert_array_equal(Bernoulli(2).mode(jnp.array([-1.0, 2.0])), [0.0, 1.0])
