"""Hawk: the sequence form equals the step-by-step form, and it keeps the transformer's interface."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from envs.base import Box
from envs.grid_pinpad import GridPinpad
from hrl.models import rollout
from hrl.models.hawk import GATE_EXPONENT, Hawk, HawkConfig
from hrl.models.heads import DiagGaussian, UnitGaussian

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
            return cache, (out.action_params, out.obs_params, e_layer)
        return jax.lax.scan(body, model.init_cache(), sequence)[1]

    actions, next_obs, e_layer = jax.vmap(run)(obs)
    np.testing.assert_allclose(actions, full.action_params, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(next_obs, full.obs_params, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(e_layer, full.residuals[layer], rtol=1e-4, atol=1e-5)


def test_step_by_step_equals_the_sequence_form_with_gaussian_heads():
    """The ant's heads: Gaussian actions with a learned (state-dependent) std, real observations."""
    cfg = HawkConfig(num_layers=2, width=16, rnn_width=16, mlp_width=16, max_len=12)
    model = Hawk(cfg, Box(-100.0, 100.0, (41,)), Box(-1.0, 1.0, (8,)), rngs=nnx.Rngs(2))
    assert model.action_dist == DiagGaussian(8) and model.obs_dist == UnitGaussian(41)
    rng = np.random.default_rng(3)
    obs = rng.standard_normal((2, 12, 41)).astype(np.float32)
    actions = rng.uniform(-1, 1, (2, 12, 8)).astype(np.float32)
    full = jax.jit(lambda o: model(o))(obs)  # one compile is cheaper than eager op by op
    assert full.action_params.shape == (2, 12, 16) and full.obs_params.shape == (2, 12, 41)

    def run(sequence):
        def body(cache, o):
            out, cache, _ = model.step(cache, o, layer=1)
            return cache, (out.action_params, out.obs_params)
        return jax.lax.scan(body, model.init_cache(), sequence)[1]

    action_params, obs_params = jax.vmap(run)(obs)
    np.testing.assert_allclose(action_params, full.action_params, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(obs_params, full.obs_params, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.action_dist.log_prob(action_params, actions),
                               model.action_dist.log_prob(full.action_params, actions), rtol=1e-4, atol=1e-4)


def test_outputs_at_t_do_not_depend_on_the_future(model, obs):
    changed = obs.at[:, 10:].set(1 - obs[:, 10:])
    np.testing.assert_array_equal(model(obs).action_params[:, :10], model(changed).action_params[:, :10])
    assert not np.allclose(model(obs).action_params[:, 10:], model(changed).action_params[:, 10:])


def test_zero_intervention_is_bitwise_and_lower_upper_is_the_full_pass(model, obs):
    plain = model(obs)
    steered = model(obs, intervention=lambda e: e + 0.0 * e, layer=1)
    np.testing.assert_array_equal(plain.action_params, steered.action_params)
    np.testing.assert_allclose(model.upper(model.lower(obs, 1), 1).action_params, plain.action_params, rtol=1e-5, atol=1e-6)


def test_packed_segments_restart_the_recurrence_and_the_convolution(model, obs):
    packed = jnp.concatenate([obs[0, :7], obs[1, :9]])[None]
    segments = jnp.array([[0] * 7 + [1] * 9])
    out = model(packed, segments=segments).action_params[0]
    np.testing.assert_allclose(out[:7], model(obs[0, :7]).action_params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[7:], model(obs[1, :9]).action_params, rtol=1e-5, atol=1e-6)


def test_a_closed_loop_episode_runs_on_the_recurrent_state():
    env = GridPinpad(horizon=20)
    model = Hawk(HawkConfig(num_layers=2, width=16, rnn_width=16, mlp_width=16, max_len=20), OBS_DIM, 4,
                 rngs=nnx.Rngs(0))
    result = rollout.evaluate(model, env, env.pretrain_params(any_task=True), jax.random.split(jax.random.key(0), 4))
    assert 0 < float(result["length"]) <= 20


class WalkEnv:
    """A point on a line, moved by the first action component; success once it is past 1."""

    max_steps = 6

    def reset(self, key, params):
        return jnp.zeros(41), jnp.float32(0.0)

    def step(self, key, x, action, params):
        x = x + action[0]
        info = {"success": x > 1.0, "progress": jnp.int32(0)}
        return jnp.zeros(41).at[0].set(x), x, 0.0, x > 1.0, jnp.bool_(False), info


def test_a_closed_loop_episode_samples_gaussian_actions_or_takes_their_mean():
    model = Hawk(HawkConfig(num_layers=1, width=16, rnn_width=16, mlp_width=16, max_len=6), Box(-100.0, 100.0, (41,)),
                 Box(-1.0, 1.0, (8,)), rngs=nnx.Rngs(0))
    keys = jax.random.split(jax.random.key(5), 32)
    sampled, greedy = (jax.jit(jax.vmap(lambda k, g=g: rollout.run_episode(model, WalkEnv(), None, k, greedy=g)))(keys)
                       for g in (False, True))
    assert len(set(np.asarray(greedy.length).tolist())) == 1  # the mean: the same episode whatever the key
    assert len(set(np.asarray(sampled.length).tolist())) > 1  # std about 1 at the start: episodes differ


def test_config_validation():
    with pytest.raises(ValueError, match="conv_width"):
        HawkConfig(conv_width=0).validate()
    with pytest.raises(ValueError, match="encoder"):
        HawkConfig(encoder="pixels").validate()
