"""Pretraining the base model: the losses fall on a tiny run, with either backbone on either action
space; evaluation is closed-loop."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from envs.base import Box
from envs.experts import make_expert, make_labelled_expert, make_task_blind_labelled_expert, per_task
from envs.grid_pinpad import GridPinpad
from hrl.algos import pretrain
from hrl.data.expert import Dataset, collect, rollout_streams
from hrl.experiment import ExperimentConfig, init_pretrain_state
from hrl.infra.config import ConfigError, load_config
from hrl.models import rollout
from hrl.models.backbones import ModelConfig
from hrl.models.hawk import Hawk
from hrl.models.heads import DiagGaussian, UnitGaussian
from hrl.models.transformer import TransformerConfig

ENV = GridPinpad()  # uniform layouts: cheaper to compile than solvable_only, enough here
MODEL = TransformerConfig(num_layers=2, width=32, num_heads=2, mlp_width=64, max_len=100)


@pytest.fixture(scope="module")
def dataset():
    return collect(ENV, ENV.pretrain_params(), make_expert(ENV, 0.0), jax.random.key(0), 64, 64)


def test_losses_fall_on_a_tiny_run(dataset):
    cfg = pretrain.PretrainConfig(learning_rate=3e-3, batch_size=16, num_updates=200, updates_per_chunk=40)
    state = pretrain.init(jax.random.key(1), cfg, MODEL, 637, 4)
    train_chunk = pretrain.make_train_chunk(cfg, pretrain.dataset_batches(dataset, cfg.batch_size, 4))
    history = []
    for _ in range(cfg.num_chunks):
        state, metrics = train_chunk(state)
        history.append(jax.device_get(metrics))
    assert history[-1]["action_nll"] < 0.8 * history[0]["action_nll"]
    assert history[-1]["obs_nll"] < 0.5 * history[0]["obs_nll"]
    assert history[-1]["action_accuracy"] > 0.4  # chance: 0.25


def test_online_batches_are_fresh_expert_episodes_packed_back_to_back_and_train():
    expert = pretrain.taken_action_targets(make_expert(ENV, 0.0), 4)
    sample = pretrain.online_batches(ENV, ENV.pretrain_params(), expert, batch_size=16)
    obs, targets, mask, segments, weights = jax.jit(sample)(jax.random.key(7))
    assert weights is None  # every step alike unless asked
    assert obs.shape == (16, ENV.max_steps, 637) and targets.shape == (16, ENV.max_steps, 4)
    assert np.all(mask) and np.all(np.isin(targets, [0.0, 1.0])) and np.all(targets.sum(-1) == 1)
    # Episodes follow each other: segments count up by one where an episode ended, and a new
    # segment starts from a fresh layout (the agent jumps instead of moving one cell at most).
    steps = np.diff(np.asarray(segments), axis=1)
    assert np.all(segments[:, 0] == 0) and np.all(np.isin(steps, [0, 1])) and segments[:, -1].mean() > 1.5
    agent = np.argmax(np.asarray(obs).reshape(16, ENV.max_steps, 49, 13)[..., 12], -1)
    row, col = np.divmod(agent, 7)
    moved = np.abs(np.diff(row, axis=1)) + np.abs(np.diff(col, axis=1))
    assert np.all(moved[steps == 0] <= 1) and np.mean(moved[steps == 1] > 1) > 0.5
    assert not np.array_equal(obs, jax.jit(sample)(jax.random.key(8))[0])
    cfg = pretrain.PretrainConfig(learning_rate=1e-2, batch_size=16, num_updates=200, updates_per_chunk=40, data="online")
    train_chunk = pretrain.make_train_chunk(cfg, sample)
    model = dataclasses.replace(MODEL, encoder="egocentric_grid")  # learns in 200 updates; flat barely starts
    state = pretrain.init(jax.random.key(1), cfg, model, 637, 4, ENV.grid_shape)
    history = []
    for _ in range(cfg.num_chunks):
        state, metrics = train_chunk(state)
        history.append(jax.device_get(metrics))
    assert history[-1]["action_nll"] < 0.95 * history[0]["action_nll"]
    assert history[-1]["action_accuracy"] > 0.35  # chance: 0.25


def test_expert_labels_are_the_clean_experts_distribution_on_the_noisy_experts_states():
    noisy = pretrain.online_batches(ENV, ENV.pretrain_params(), make_labelled_expert(ENV, 0.5), 64)
    obs, targets, mask, segments, _ = jax.device_get(jax.jit(noisy)(jax.random.key(9)))
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    # Ties among optimal moves give soft targets; half of the moves are random, so the taken
    # moves leave the expert's path and the episodes are longer than the clean expert's.
    assert np.any((targets > 0) & (targets < 1))
    clean = pretrain.online_batches(ENV, ENV.pretrain_params(), make_labelled_expert(ENV, 0.0), 64)
    _, clean_targets, _, clean_segments, _ = jax.device_get(jax.jit(clean)(jax.random.key(9)))
    assert segments[:, -1].mean() < 0.8 * clean_segments[:, -1].mean()  # fewer, longer episodes
    # Same key, same clean episodes as the plain expert's: every action it took is one the
    # distribution allows.
    taken = pretrain.online_batches(ENV, ENV.pretrain_params(), pretrain.taken_action_targets(make_expert(ENV, 0.0), 4), 64)
    taken_targets = jax.device_get(jax.jit(taken)(jax.random.key(9)).targets)
    assert np.all(clean_targets[taken_targets.astype(bool)] > 0)


def test_boundary_weights_weigh_the_steps_that_choose_the_next_subgoal():
    weight = pretrain.boundary_weight(3.0)
    _, state = ENV.reset(jax.random.key(0), ENV.pretrain_params())
    # Colours visited so far: a pair's second colour is next at odd counts, the first subgoal at 0.
    assert [float(weight(state.replace(progress=jnp.int32(k)))) for k in range(6)] == [1, 1, 3, 1, 3, 1]
    labelled = make_labelled_expert(ENV, 0.2)
    weighted = jax.jit(pretrain.online_batches(ENV, ENV.pretrain_params(), labelled, 16, step_weight=weight))
    batch = jax.device_get(weighted(jax.random.key(9)))
    plain = jax.device_get(jax.jit(pretrain.online_batches(ENV, ENV.pretrain_params(), labelled, 16))(jax.random.key(9)))
    np.testing.assert_array_equal(batch.obs, plain.obs)  # the same episodes
    np.testing.assert_array_equal(batch.targets, plain.targets)
    assert set(np.unique(batch.weights)) == {1.0, 3.0}
    # The loss weighs the action NLL; the logged action NLL stays the plain mean.
    cfg = pretrain.PretrainConfig(obs_loss_weight=0.0)
    state = pretrain.init(jax.random.key(1), cfg, MODEL, 637, 4)
    loss, terms = pretrain.objective(state.params, state.graphdef, pretrain.Batch(*map(jnp.asarray, batch)), cfg)
    nll = state.module().action_dist.target_nll(state.module()(batch.obs, segments=batch.segments).action_params,
                                                batch.targets)
    np.testing.assert_allclose(terms["action_nll"], np.mean(nll), rtol=1e-5)
    np.testing.assert_allclose(loss, np.sum(nll * batch.weights) / np.sum(batch.weights), rtol=1e-5)
    with pytest.raises(ConfigError, match="pretrain.boundary_weight"):
        load_config(ExperimentConfig, "gridworld/quick", ["pretrain.boundary_weight=3", "pretrain.labels=posterior"])


def test_posterior_labels_average_the_clean_labels_over_the_tasks_the_episode_leaves_possible():
    params = ENV.pretrain_params()
    streams = jax.jit(lambda key: rollout_streams(ENV, params, make_task_blind_labelled_expert(ENV, 0.2), key, 32, 100))
    task_blind = jax.device_get(streams(jax.random.key(9)))
    plain = jax.device_get(jax.jit(lambda key: rollout_streams(ENV, params, make_labelled_expert(ENV, 0.2), key, 32, 100))(
        jax.random.key(9)))
    np.testing.assert_array_equal(task_blind.obs, plain.obs)  # the same episodes, labelled two ways
    targets = np.asarray(jax.jit(pretrain.posterior_targets, static_argnums=1)(task_blind, False))
    np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-5)
    view = task_blind.labels
    # Where every task still possible heads for the same colour, the posterior is the label itself.
    spread = np.where(view.consistent[..., None], view.clean, np.nan)
    agree = np.nanmax(spread, axis=-2) - np.nanmin(spread, axis=-2)
    agreed = np.all(agree < 1e-6, axis=-1)
    np.testing.assert_allclose(targets[agreed], plain.labels[agreed], atol=1e-5)
    # Elsewhere it mixes the possible tasks' moves until the moves single one out.
    assert agreed.mean() > 0.3 and np.mean(np.abs(targets[~agreed] - plain.labels[~agreed]).sum(-1) > 0.05) > 0.3
    # At an episode's first step nothing has been seen but the layout: every task alike (uniform
    # prior over layouts that are not redrawn), each episode afresh.
    first = np.diff(task_blind.segments, axis=1, prepend=-1) != 0
    np.testing.assert_allclose(targets[first], view.clean[first].mean(-2), atol=1e-5)


def test_own_episodes_are_the_models_closed_loop_episodes_labelled_with_the_task_posterior():
    model = pretrain.init(jax.random.key(1), pretrain.PretrainConfig(), MODEL, 637, 4).module()
    sample = pretrain.own_episode_batches(ENV, 16, 0.2, layouts_doable=False)
    obs, targets, mask, segments, weights = jax.device_get(jax.jit(sample)(jax.random.key(3), model))
    # One closed-loop episode of the model per row, as long as `rollout.run_episode`'s with the
    # same key, the steps after its end masked.
    params = ENV.pretrain_params(any_task=True)
    lengths = jax.vmap(lambda k: rollout.run_episode(model, ENV, params, k).length)(jax.random.split(jax.random.key(3), 16))
    np.testing.assert_array_equal(mask, np.arange(ENV.max_steps) < np.asarray(lengths)[:, None])
    assert np.all(segments == 0) and np.all(weights == 1) and 1 < lengths.mean() < ENV.max_steps
    agent = np.argmax(obs.reshape(16, ENV.max_steps, 49, 13)[..., 12], -1)
    moved = np.abs(np.diff(agent // 7, axis=1)) + np.abs(np.diff(agent % 7, axis=1))
    assert np.all(moved[mask[:, 1:]] <= 1)
    # Targets: distributions on the episode's steps (0 after it: no NaN in the masked loss); at
    # the first step, nothing seen but the layout, every task's clean move averaged alike.
    np.testing.assert_allclose(targets[mask].sum(-1), 1.0, atol=1e-5)
    assert np.all(targets[~mask] == 0)
    _, state = ENV.reset(jax.random.split(jax.random.split(jax.random.key(3), 16)[0])[0], params)
    view = per_task(state, params, 0.2, ENV.horizon)
    np.testing.assert_allclose(targets[0, 0], np.asarray(view.clean).mean(0), atol=1e-5)


def test_own_episodes_join_every_batch_and_train():
    cfg = pretrain.PretrainConfig(learning_rate=1e-2, batch_size=8, num_updates=200, updates_per_chunk=50,
                                  data="online", labels="expert", own_episodes=8, obs_loss_weight=0.0)
    expert = pretrain.online_batches(ENV, ENV.pretrain_params(), make_labelled_expert(ENV, 0.2), cfg.batch_size)
    own = pretrain.own_episode_batches(ENV, cfg.own_episodes, 0.2, layouts_doable=False)
    model = dataclasses.replace(MODEL, encoder="egocentric_grid")
    state = pretrain.init(jax.random.key(1), cfg, model, 637, 4, ENV.grid_shape)
    rows = pretrain.concatenate_rows(expert(jax.random.key(0)), own(jax.random.key(1), state.module()))
    assert rows.obs.shape[0] == 16 and rows.weights.shape == rows.mask.shape
    train_chunk = pretrain.make_train_chunk(cfg, expert, own_batch=own)
    history = []
    for _ in range(cfg.num_chunks):
        state, metrics = train_chunk(state)
        history.append(jax.device_get(metrics))
    assert all(np.isfinite(m["loss"]) for m in history)
    assert history[-1]["action_nll"] < 0.95 * history[0]["action_nll"]


def test_expert_labels_and_own_episodes_need_online_data():
    with pytest.raises(ValueError, match="labels"):
        pretrain.PretrainConfig(labels="expert").validate()
    with pytest.raises(ValueError, match="own_episodes"):
        pretrain.PretrainConfig(own_episodes=8).validate()
    with pytest.raises(ConfigError, match="pretrain.own_episodes"):
        load_config(ExperimentConfig, "gridworld/quick", ["pretrain.own_episodes=-1"])
    for key in ("pretrain.own_episodes=8", "pretrain.boundary_weight=3"):  # grid only: refused before any work
        with pytest.raises(ConfigError, match=key.split("=")[0]):
            load_config(ExperimentConfig, "ant/quick", [key, "pretrain.data=online", "pretrain.labels=taken"])


def test_observation_loss_ignores_steps_without_a_next_observation():
    model = pretrain.init(jax.random.key(2), pretrain.PretrainConfig(), MODEL, 637, 4).module()
    obs = (jax.random.uniform(jax.random.key(3), (2, 6, 637)) < 0.05).astype(jnp.uint8)
    actions = jax.nn.one_hot(jnp.zeros((2, 6), jnp.int32), 4)
    mask = jnp.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    base = pretrain.losses(model, obs, actions, mask)
    garbage = obs.at[0, 3:].set(1)  # after the first episode's end: must not matter
    np.testing.assert_allclose(pretrain.losses(model, garbage, actions, mask)["obs_nll"], base["obs_nll"], rtol=1e-6)


def test_observation_loss_stops_at_the_end_of_a_packed_episode():
    model = pretrain.init(jax.random.key(2), pretrain.PretrainConfig(), MODEL, 637, 4).module()
    obs = (jax.random.uniform(jax.random.key(3), (1, 6, 637)) < 0.05).astype(jnp.uint8)
    actions, mask = jax.nn.one_hot(jnp.zeros((1, 6), jnp.int32), 4), jnp.ones((1, 6), bool)
    segments = jnp.array([[0, 0, 0, 1, 1, 1]])
    packed = pretrain.losses(model, obs, actions, mask, segments)
    # Two episodes of three steps: two observation targets each, the next episode's first
    # observation is none of them, so the packed loss is the mean of each episode's loss alone.
    alone = [pretrain.losses(model, obs[:, i : i + 3], actions[:, :3], mask[:, :3]) for i in (0, 3)]
    np.testing.assert_allclose(packed["obs_nll"], (alone[0]["obs_nll"] + alone[1]["obs_nll"]) / 2, rtol=1e-5)
    np.testing.assert_allclose(packed["action_nll"], (alone[0]["action_nll"] + alone[1]["action_nll"]) / 2, rtol=1e-5)
    assert "obs_nll" not in pretrain.losses(model, obs, actions, mask, segments, observation_loss=False)


def test_learning_rate_decays_to_the_final_fraction():
    cfg = pretrain.PretrainConfig(learning_rate=1e-3, final_lr_fraction=0.1, num_updates=100, updates_per_chunk=50)
    params = {"w": jnp.ones(3)}
    optimizer = pretrain.make_optimizer(cfg)
    state = optimizer.init(params)
    sizes = []
    for _ in range(100):
        updates, state = optimizer.update({"w": jnp.ones(3)}, state, params)  # Adam: steps of size ~lr
        sizes.append(float(jnp.abs(updates["w"][0])))
    assert sizes[0] == pytest.approx(1e-3 * (1 + 0.03), rel=1e-2)  # lr x (Adam's 1 + decoupled decay)
    assert sizes[-1] == pytest.approx(1e-4 * (1 + 0.03), rel=5e-2)


def test_closed_loop_evaluation_reports_rates(dataset):
    cfg = pretrain.PretrainConfig(eval_episodes=8)
    state = pretrain.init(jax.random.key(4), cfg, MODEL, 637, 4)
    metrics = jax.device_get(pretrain.make_evaluate(cfg, ENV, jax.random.key(5))(state))
    for task in ("any_pretrain", "posttrain"):
        for decoding in ("", "greedy_"):
            assert 0.0 <= metrics[f"{task}/{decoding}success_rate"] <= 1.0
            assert 1.0 <= metrics[f"{task}/{decoding}length"] <= 100.0
    # The greedy episodes are the most likely actions' (the layouts are the same).
    greedy = rollout.evaluate(state.module(), ENV, ENV.pretrain_params(any_task=True),
                              jax.random.split(jax.random.key(5), 8), greedy=True)
    assert metrics["any_pretrain/greedy_length"] == pytest.approx(float(greedy["length"]))


def test_padding_after_the_longest_episode_changes_no_loss(dataset):
    model = pretrain.init(jax.random.key(6), pretrain.PretrainConfig(), MODEL, 637, 4).module()
    solved = np.flatnonzero(dataset.success)[:8]
    obs, actions, mask = dataset.obs[solved], np.eye(4)[dataset.actions[solved]], dataset.mask[solved]
    longest = int(dataset.lengths[solved].max())
    assert longest < dataset.horizon  # the crop does something
    full = pretrain.losses(model, jnp.asarray(obs), jnp.asarray(actions), jnp.asarray(mask))
    cropped = pretrain.losses(model, *(jnp.asarray(x[:, :longest]) for x in (obs, actions, mask)))
    for name in full:
        np.testing.assert_allclose(cropped[name], full[name], rtol=1e-5)


# --- either backbone, either action space

ANT_OBSERVATION, ANT_ACTION = Box(-100.0, 100.0, (41,)), Box(-1.0, 1.0, (8,))  # the ant's spaces


def ant_shaped_dataset(num_episodes: int = 16, horizon: int = 24) -> Dataset:
    """Random-walk observations (so the next one is predictable) and actions that are a fixed
    function of them, of the ant's sizes, with episodes of different lengths."""
    rng = np.random.default_rng(11)  # numpy: a dataset is host arrays, and eager JAX ops cost compiles
    obs = np.cumsum(0.3 * rng.standard_normal((num_episodes, horizon, 41)), axis=1).astype(np.float32)
    actions = np.clip(np.tanh(obs[..., :8]) + 0.1 * rng.standard_normal(obs.shape[:2] + (8,)), -1, 1).astype(np.float32)
    lengths = rng.integers(horizon // 2, horizon + 1, num_episodes).astype(np.int32)
    mask = np.arange(horizon) < lengths[:, None]
    zeros = np.zeros((num_episodes, horizon), np.int32)
    return Dataset(obs, actions, mask, zeros, zeros[:, 0], lengths, zeros[:, 0] > 0)


@pytest.mark.parametrize("backbone, env_name", [("transformer", "grid"), ("hawk", "grid"), ("hawk", "ant")])
def test_the_same_stage_code_pretrains_either_backbone_on_either_action_space(dataset, backbone, env_name):
    model_cfg = ModelConfig(backbone=backbone, num_layers=1, width=16, num_heads=2, mlp_width=16, rnn_width=16)
    if env_name == "grid":
        data, observation, action, obs_weight = dataset, ENV.observation_space, ENV.action_space, 0.01
    else:
        data, observation, action, obs_weight = ant_shaped_dataset(), ANT_OBSERVATION, ANT_ACTION, 10.0  # paper: 10
    cfg = pretrain.PretrainConfig(learning_rate=1e-2, batch_size=4, num_updates=20, updates_per_chunk=10,
                                  obs_loss_weight=obs_weight)
    state = pretrain.init(jax.random.key(1), cfg, model_cfg, observation, action)
    assert type(state.module()).__name__ == {"transformer": "Transformer", "hawk": "Hawk"}[backbone]
    train_chunk = pretrain.make_train_chunk(cfg, pretrain.dataset_batches(data, cfg.batch_size, action))
    history = []
    for _ in range(cfg.num_chunks):
        state, metrics = train_chunk(state)
        history.append(jax.device_get(metrics))
    fit = "action_accuracy" if env_name == "grid" else "action_mse"  # mean action vs the data's, squared
    assert set(history[0]) == {"loss", "action_nll", "obs_nll", fit}
    assert all(np.isfinite(m["loss"]) for m in history)
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["action_nll"] < history[0]["action_nll"]
    if env_name == "ant":
        assert history[-1]["action_mse"] < history[0]["action_mse"]


def test_the_ant_preset_builds_a_hawk_with_gaussian_heads():
    config = load_config(ExperimentConfig, "ant/quick")
    assert config.model.backbone == "hawk" and config.pretrain.obs_loss_weight == 10.0  # paper: lambda = 10
    env = envs.make(config.env.name, horizon=config.env.horizon)
    model = jax.eval_shape(lambda: init_pretrain_state(config, env, jax.random.key(0))).module()  # shapes only
    assert isinstance(model, Hawk) and model.num_layers == config.model.num_layers
    assert model.action_dist == DiagGaussian(8) and model.obs_dist == UnitGaussian(41)
    paper = load_config(ExperimentConfig, "ant/paper")
    assert (paper.model.backbone, paper.model.num_layers, paper.model.width, paper.model.mlp_width) == ("hawk", 8, 256, 512)
    load_config(ExperimentConfig, "ant/quick", ["pretrain.data=online"])  # the PPO expert inside the update
    with pytest.raises(ConfigError, match="pretrain.labels"):
        load_config(ExperimentConfig, "ant/quick", ["pretrain.data=online", "pretrain.labels=expert"])
    with pytest.raises(ConfigError, match="model.backbone"):
        load_config(ExperimentConfig, "gridworld/quick", ["model.backbone=lstm"])


def test_a_model_config_builds_the_same_transformer_as_its_own_config():
    """The experiment's flat `model` section and the transformer's own config give one model, bitwise."""
    sizes = dict(num_layers=1, width=16, num_heads=2, mlp_width=32, max_len=100, relpos_init_slope=1.0)
    flat = pretrain.init(jax.random.key(3), pretrain.PretrainConfig(), ModelConfig(**sizes), ENV.observation_space,
                         ENV.action_space)
    own = pretrain.init(jax.random.key(3), pretrain.PretrainConfig(), TransformerConfig(**sizes), 637, 4)
    assert jax.tree.all(jax.tree.map(np.array_equal, flat.params, own.params))
