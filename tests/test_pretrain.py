"""Pretraining the base transformer: the losses fall on a tiny run; evaluation is closed-loop."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs.experts import make_expert, make_expert_probabilities
from envs.grid_pinpad import GridPinpad
from hrl.algos import pretrain
from hrl.data.expert import collect
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


def test_online_batches_are_fresh_expert_episodes_and_train():
    sample = pretrain.online_batches(ENV, ENV.pretrain_params(), make_expert(ENV, 0.0), batch_size=16)
    obs, targets, mask = jax.jit(sample)(jax.random.key(7))
    assert obs.shape == (16, ENV.max_steps, 637) and targets.shape == (16, ENV.max_steps, 4)
    assert mask.shape == (16, ENV.max_steps) and np.all(np.isin(targets, [0.0, 1.0])) and np.all(targets.sum(-1) == 1)
    # Each episode is a prefix of real steps, then padding; a second key gives other episodes.
    assert np.all(np.diff(np.asarray(mask).astype(int), axis=1) <= 0) and np.all(mask[:, 0])
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
    teacher = make_expert_probabilities(ENV)
    noisy = pretrain.online_batches(ENV, ENV.pretrain_params(), make_expert(ENV, 0.5), 64, teacher)
    obs, targets, mask = jax.device_get(jax.jit(noisy)(jax.random.key(9)))
    np.testing.assert_allclose(targets[mask].sum(-1), 1.0, rtol=1e-6)
    # Ties among optimal moves give soft targets; half of the moves are random, so the taken
    # moves leave the expert's path and the episodes are longer than the clean expert's.
    assert np.any((targets[mask] > 0) & (targets[mask] < 1))
    clean = pretrain.online_batches(ENV, ENV.pretrain_params(), make_expert(ENV, 0.0), 64, teacher)
    _, clean_targets, clean_mask = jax.device_get(jax.jit(clean)(jax.random.key(9)))
    assert mask.sum(1).mean() > 1.2 * clean_mask.sum(1).mean()
    # Same key, same clean episodes: every action the clean expert took is one its distribution allows.
    taken = jax.device_get(jax.jit(pretrain.online_batches(ENV, ENV.pretrain_params(), make_expert(ENV, 0.0), 64))(
        jax.random.key(9))[1])
    assert np.all(clean_targets[clean_mask][taken[clean_mask].astype(bool)] > 0)


def test_expert_labels_need_online_data():
    with pytest.raises(ValueError, match="labels"):
        pretrain.PretrainConfig(labels="expert").validate()


def test_observation_loss_ignores_steps_without_a_next_observation():
    model = pretrain.init(jax.random.key(2), pretrain.PretrainConfig(), MODEL, 637, 4).module()
    obs = (jax.random.uniform(jax.random.key(3), (2, 6, 637)) < 0.05).astype(jnp.uint8)
    actions = jax.nn.one_hot(jnp.zeros((2, 6), jnp.int32), 4)
    mask = jnp.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    base = pretrain.losses(model, obs, actions, mask)
    garbage = obs.at[0, 3:].set(1)  # after the first episode's end: must not matter
    np.testing.assert_allclose(pretrain.losses(model, garbage, actions, mask)["obs_nll"], base["obs_nll"], rtol=1e-6)


def test_closed_loop_evaluation_reports_rates(dataset):
    cfg = pretrain.PretrainConfig(eval_episodes=8)
    state = pretrain.init(jax.random.key(4), cfg, MODEL, 637, 4)
    metrics = jax.device_get(pretrain.make_evaluate(cfg, ENV, jax.random.key(5))(state))
    for task in ("any_pretrain", "posttrain"):
        assert 0.0 <= metrics[f"{task}/success_rate"] <= 1.0
        assert 1.0 <= metrics[f"{task}/length"] <= 100.0


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
