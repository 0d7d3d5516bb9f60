"""The base transformer: causal, cached decoding equals the full pass, zero interventions are exact."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hrl.models.transformer import Transformer, TransformerConfig, initial_relpos_bias, relative_position_bucket

CFG = TransformerConfig(num_layers=3, width=32, num_heads=4, mlp_width=64, max_len=16)
OBS_DIM = 637


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, OBS_DIM, 4, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def obs():
    return (jax.random.uniform(jax.random.key(1), (3, 16, OBS_DIM)) < 0.02).astype(jnp.uint8)


def test_shapes(model, obs):
    out = model(obs)
    assert out.action_params.shape == (3, 16, 4)
    assert out.obs_params.shape == (3, 16, OBS_DIM)
    assert out.residuals.shape == (CFG.num_layers + 1, 3, 16, CFG.width)


def test_outputs_at_t_do_not_depend_on_the_future(model, obs):
    changed = obs.at[:, 10:].set(1 - obs[:, 10:])
    a, b = model(obs), model(changed)
    np.testing.assert_array_equal(a.action_params[:, :10], b.action_params[:, :10])
    assert not np.allclose(a.action_params[:, 10:], b.action_params[:, 10:])


def test_cached_decoding_equals_the_full_forward_pass(model, obs):
    intervention = lambda e: e * 1.5  # noqa: E731  (also checks the intervention path)
    full = model(obs, intervention=intervention, layer=2)
    step = jax.jit(jax.vmap(lambda cache, o: model.step(cache, o, intervention, layer=2)))
    cache = model.init_cache((3,))
    action_params, obs_params, residuals = [], [], []
    for t in range(16):
        out, cache, e = step(cache, obs[:, t])
        action_params.append(out.action_params)
        obs_params.append(out.obs_params)
        residuals.append(e)
    np.testing.assert_allclose(jnp.stack(action_params, 1), full.action_params, atol=1e-5)
    np.testing.assert_allclose(jnp.stack(obs_params, 1), full.obs_params, atol=1e-5)
    np.testing.assert_allclose(jnp.stack(residuals, 1), full.residuals[2], atol=1e-5)
    assert int(cache["t"][0]) == 16


def test_zero_intervention_is_bitwise_the_base_model(model, obs):
    base = model(obs)
    zero_controller = jnp.zeros((CFG.width, CFG.width))
    for layer in range(CFG.num_layers + 1):
        steered = model(obs, intervention=lambda e: e + e @ zero_controller, layer=layer)
        np.testing.assert_array_equal(steered.action_params, base.action_params)
        np.testing.assert_array_equal(steered.obs_params, base.obs_params)


def test_lower_then_upper_equals_the_full_pass(model, obs):
    full = model(obs)
    e = model.lower(obs, 2)
    np.testing.assert_array_equal(e, full.residuals[2])
    np.testing.assert_allclose(model.upper(e, 2).action_params, full.action_params, atol=1e-6)


def test_relative_position_buckets():
    distance = jnp.arange(300)
    buckets = relative_position_bucket(distance, 32, 128)
    np.testing.assert_array_equal(buckets[:16], np.arange(16))  # exact near
    assert bool(jnp.all(jnp.diff(buckets) >= 0)) and int(buckets.max()) == 31


def test_recency_prior_of_the_position_bias():
    paper = Transformer(CFG, OBS_DIM, 4, rngs=nnx.Rngs(0)).blocks[0].attention.relpos_bias[...]
    assert not np.any(np.asarray(paper))  # slope 0: the paper's zero start
    bias = np.asarray(initial_relpos_bias(TransformerConfig(num_heads=4, relpos_init_slope=2.0)))
    np.testing.assert_allclose(np.diff(bias, axis=0), np.broadcast_to([-2.0, -0.5, -0.125, -0.03125], (31, 4)))


def test_config_validation():
    with pytest.raises(ValueError, match="num_heads"):
        TransformerConfig(width=30, num_heads=4).validate()
    with pytest.raises(ValueError, match="init_scale"):
        TransformerConfig(init_scale=0).validate()
    with pytest.raises(ValueError, match="relpos_init_slope"):
        TransformerConfig(relpos_init_slope=-1).validate()


def test_egocentric_encoder_centres_the_agent():
    from envs.grid_pinpad import GridPinpad, observe
    from hrl.models import encoders

    env = GridPinpad()
    _, state = env.reset(jax.random.key(3), env.default_params)
    features = encoders.encode("egocentric_grid", observe(state), env.grid_shape)
    assert features.shape == (encoders.feature_dim("egocentric_grid", OBS_DIM, env.grid_shape),) == (13 * 13 * 13 + OBS_DIM,)
    window = np.asarray(features[: 13 * 13 * 13]).reshape(13, 13, 13)
    agent_row, agent_col = divmod(int(state.agent), 7)
    for colour in range(8):
        row, col = divmod(int(state.colour_cells[colour]), 7)
        assert window[6 + row - agent_row, 6 + col - agent_col, 4 + colour] == 1
    assert window[..., :12].sum() == 12  # every object once, nothing else
    assert window[..., 12].sum() == 49 and window[6, 6, 12] == 1  # the grid's 49 cells, agent at the centre
    np.testing.assert_array_equal(features[13 * 13 * 13 :], observe(state))


def test_egocentric_model_runs_and_needs_a_grid_shape(obs):
    cfg = TransformerConfig(num_layers=1, width=16, num_heads=2, mlp_width=16, max_len=16, encoder="egocentric_grid")
    model = Transformer(cfg, OBS_DIM, 4, grid_shape=(7, 7, 13), rngs=nnx.Rngs(0))
    assert model(obs).action_params.shape == (3, 16, 4)
    with pytest.raises(ValueError, match="grid shape"):
        Transformer(cfg, OBS_DIM, 4, rngs=nnx.Rngs(0))


def test_sparse_egocentric_embedding_is_the_dense_linear_map():
    from envs.grid_pinpad import GridPinpad
    from hrl.models import encoders

    env = GridPinpad()
    obs = jax.vmap(lambda k: env.reset(k, env.default_params)[0])(jax.random.split(jax.random.key(0), 64))
    features = encoders.feature_dim("egocentric_grid", OBS_DIM, env.grid_shape)
    kernel = jax.random.normal(jax.random.key(1), (features, 8))
    bias = jax.random.normal(jax.random.key(2), (8,))
    dense = encoders.encode("egocentric_grid", obs, env.grid_shape) @ kernel + bias
    np.testing.assert_allclose(encoders.embed("egocentric_grid", obs, kernel, bias, env.grid_shape), dense, atol=1e-4)


def test_packed_segments_give_each_episode_its_own_outputs(model, obs):
    # Two episodes packed into one sequence (5 steps, then 11) vs each run alone.
    segments = jnp.where(jnp.arange(16) < 5, 0, 1)
    packed = model(obs[0], segments=segments).action_params
    np.testing.assert_allclose(packed[:5], model(obs[0, :5]).action_params, atol=1e-5)
    np.testing.assert_allclose(packed[5:], model(obs[0, 5:]).action_params, atol=1e-5)
    assert not np.allclose(packed[5:], model(obs[0]).action_params[5:], atol=1e-3)  # unpacked, they differ


def agent_walk(cells: list[int]) -> jax.Array:
    """Grid observations [T, 637] of an agent in `cells` (the other objects fixed and out of its way)."""
    from envs.grid_pinpad import GridPinpad, observe

    _, state = GridPinpad().reset(jax.random.key(3), GridPinpad().default_params)
    return jnp.stack([observe(state.replace(agent=jnp.int32(cell))) for cell in cells])


def test_agent_moves_are_read_from_consecutive_observations():
    from hrl.models import encoders

    walk = agent_walk([24, 24, 17, 24, 23, 24])  # start, stay, up, down, left, right (7 columns)
    np.testing.assert_array_equal(encoders.agent_moves(walk, (7, 7, 13)), [0, 1, 2, 3, 4, 5])
    # A packed second episode from step 3 on has no previous step there.
    segments = jnp.array([0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(encoders.agent_moves(walk, (7, 7, 13), segments), [0, 1, 2, 0, 4, 5])


def test_cached_decoding_with_embedded_moves_equals_the_full_pass():
    cfg = TransformerConfig(num_layers=2, width=16, num_heads=2, mlp_width=16, max_len=8, encoder="egocentric_grid",
                            embed_moves=True)
    model = Transformer(cfg, OBS_DIM, 4, grid_shape=(7, 7, 13), rngs=nnx.Rngs(0))
    walk = agent_walk([24, 25, 25, 18, 17, 24, 31, 30])
    full = model(walk).action_params
    cache, stepped = model.init_cache(), []
    for o in walk:
        out, cache, _ = model.step(cache, o)
        stepped.append(out.action_params)
    np.testing.assert_allclose(jnp.stack(stepped), full, atol=1e-5)
    # Each token adds the vector of its move: first, right, stay, up, left, down, down, left.
    np.testing.assert_allclose(model.embed(walk) - model.embed_observation(walk),
                               model.move_embedding[...][jnp.array([0, 5, 1, 2, 4, 3, 3, 4])], atol=1e-6)
    packed = model(walk, segments=jnp.where(jnp.arange(8) < 3, 0, 1)).action_params
    np.testing.assert_allclose(packed[3:], model(walk[3:]).action_params, atol=1e-5)
    with pytest.raises(ValueError, match="grid shape"):
        Transformer(dataclasses.replace(cfg, encoder="flat"), OBS_DIM, 4, rngs=nnx.Rngs(0))


def test_only_the_transformer_embeds_moves():
    from hrl.models.backbones import ModelConfig

    ModelConfig(embed_moves=True).validate()
    with pytest.raises(ValueError, match="embed_moves"):
        ModelConfig(backbone="hawk", embed_moves=True).validate()
