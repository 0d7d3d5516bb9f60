"""Hawk: the sequence form equals the step-by-step form, and it keeps the transformer's interface."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from envs.grid_pinpad import GridPinpad
from hrl.models import rollout
from hrl.models.hawk import GATE_EXPONENT, Hawk, HawkConfig

CFG = HawkConfig(num_layers=3, width=32, rnn_width=24, mlp_width=48, max_len=16)
OBS_DIM = 637


@pytest.fixture(scope="module")
def model():
    return Hawk(CFG, OBS_DIM, 4, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def obs():
    return (jax.random.uniform(jax.random.key(1), (3, 16, OBS_DIM)) < 0.02).astype(jnp.uint8)


def test_initial_decay_is_in_the_papers_range(model):
    a_to_c = jax.nn.sigmoid(model.blocks[0].rg_lru.log_decay_rate[...]) ** GATE_EXPONENT
    assert float(a_to_c.min()) >= 0.9 - 1e-6 and float(a_to_c.max()) <= 0.999 + 1e-6


def test_step_by_step_equals_the_sequence_form(model, obs):
    layer = 2
    full = model(obs)

    def run(sequence):
        def body(cache, o):
            out, cache, e_layer = model.step(cache, o, layer=layer)
            return cache, (out.action_logits, out.obs_logits, e_layer)
        return jax.lax.scan(body, model.init_cache(), sequence)[1]

    actions, next_obs, e_layer = jax.vmap(run)(obs)
    np.testing.assert_allclose(actions, full.action_logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(next_obs, full.obs_logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(e_layer, full.residuals[layer], rtol=1e-4, atol=1e-5)


def test_outputs_at_t_do_not_depend_on_the_future(model, obs):
    changed = obs.at[:, 10:].set(1 - obs[:, 10:])
    np.testing.assert_array_equal(model(obs).action_logits[:, :10], model(changed).action_logits[:, :10])
    assert not np.allclose(model(obs).action_logits[:, 10:], model(changed).action_logits[:, 10:])


def test_zero_intervention_is_bitwise_and_lower_upper_is_the_full_pass(model, obs):
    plain = model(obs)
    steered = model(obs, intervention=lambda e: e + 0.0 * e, layer=1)
    np.testing.assert_array_equal(plain.action_logits, steered.action_logits)
    np.testing.assert_allclose(model.upper(model.lower(obs, 1), 1).action_logits, plain.action_logits, rtol=1e-5, atol=1e-6)


def test_packed_segments_restart_the_recurrence_and_the_convolution(model, obs):
    packed = jnp.concatenate([obs[0, :7], obs[1, :9]])[None]
    segments = jnp.array([[0] * 7 + [1] * 9])
    out = model(packed, segments=segments).action_logits[0]
    np.testing.assert_allclose(out[:7], model(obs[0, :7]).action_logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[7:], model(obs[1, :9]).action_logits, rtol=1e-5, atol=1e-6)


def test_a_closed_loop_episode_runs_on_the_recurrent_state():
    env = GridPinpad(horizon=20)
    model = Hawk(HawkConfig(num_layers=2, width=16, rnn_width=16, mlp_width=16, max_len=20), OBS_DIM, 4,
                 rngs=nnx.Rngs(0))
    result = rollout.evaluate(model, env, env.pretrain_params(any_task=True), jax.random.split(jax.random.key(0), 4))
    assert 0 < float(result["length"]) <= 20


def test_config_validation():
    with pytest.raises(ValueError, match="conv_width"):
        HawkConfig(conv_width=0).validate()
    with pytest.raises(ValueError, match="encoder"):
        HawkConfig(encoder="pixels").validate()
