"""Discovery: the metacontroller learns on D* with the base frozen (bitwise), the co-trained
variant trains both, the switching statistics are right on hand-made episodes, and the stage
runs through the CLI and makes its figures."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from envs.experts import expert_probabilities, make_expert
from envs.grid_pinpad import GridPinpad
from hrl import cli
from hrl.algos import discovery
from hrl.algos.probe import split_episodes
from hrl.analysis.figures import write_figures
from hrl.analysis.segmentation import subgoal_boundaries, switching_statistics
from hrl.experiment import DISCOVERY_ANALYSIS
from hrl.infra.rundir import RunDir
from hrl.models.metacontroller import MetacontrollerConfig
from hrl.models.transformer import Transformer
from conftest import host_copy

META = MetacontrollerConfig(history_size=8, summary_size=8, encoder_hidden=16, switch_hidden=8, decoder_hidden=8,
                            rank=4)





def train(state, train_chunk, num_chunks):
    history = []
    for _ in range(num_chunks):
        state, metrics = train_chunk(state)
        history.append(jax.device_get(metrics))
    return state, history


def test_discovery_learns_and_leaves_the_frozen_base_model_bitwise_unchanged(clean_data, base):
    before = host_copy(nnx.state(base))
    cfg = discovery.DiscoveryConfig(alphas=(0.0, 0.3), learning_rate=1e-2, batch_size=8, num_updates=60,
                                    updates_per_chunk=20)
    state = discovery.init(jax.random.key(0), cfg, META, "frozen", base)
    # The train state holds one metacontroller per alpha and nothing of the base model.
    assert {leaf.shape[0] for leaf in jax.tree.leaves(state.params)} == {2}
    assert set(state.params.keys()) == {"metacontroller"}
    episodes = discovery.dataset_episodes(clean_data, cfg.batch_size)
    state, history = train(state, discovery.make_train_chunk(cfg, META, base, 1, episodes), cfg.num_chunks)
    for alpha in ("alpha_0", "alpha_0.3"):
        assert history[-1][f"loss/{alpha}"] < history[0][f"loss/{alpha}"]
    assert history[-1]["kl/alpha_0.3"] < history[-1]["kl/alpha_0"]  # the price of information
    jax.tree.map(np.testing.assert_array_equal, host_copy(nnx.state(base)), before)


def test_alpha_is_free_during_the_kl_delay_and_charged_after_it(clean_data, base):
    cfg = discovery.DiscoveryConfig(alphas=(0.5,), batch_size=4, num_updates=20, updates_per_chunk=10,
                                    kl_delay_updates=10, kl_warmup_updates=5)
    np.testing.assert_allclose(discovery.kl_scale(cfg, jnp.arange(16)), [0.0] * 10 + [0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    state = discovery.init(jax.random.key(0), cfg, META, "frozen", base)
    episodes = discovery.dataset_episodes(clean_data, cfg.batch_size)
    _, (delayed, charged) = train(state, discovery.make_train_chunk(cfg, META, base, 1, episodes), cfg.num_chunks)
    # The logged loss is NLL + scale x alpha x KL, averaged over the chunk's updates.
    assert delayed["loss/alpha_0.5"] == pytest.approx(delayed["action_nll/alpha_0.5"])
    assert charged["loss/alpha_0.5"] > charged["action_nll/alpha_0.5"] + 0.1 * charged["kl/alpha_0.5"]


def test_expert_labels_are_the_clean_experts_distribution_over_the_same_episodes():
    env = GridPinpad(solvable_only=False, horizon=30)
    params, expert = env.pretrain_params(), make_expert(env, 0.0)
    key = jax.random.key(3)
    obs, actions, mask = discovery.online_episodes(env, params, expert, 4)(key)
    labelled_obs, labels, labelled_mask = discovery.online_episodes(env, params, expert, 4, expert_probabilities)(key)
    np.testing.assert_array_equal(labelled_obs, obs)
    np.testing.assert_array_equal(labelled_mask, mask)
    assert labels.shape == (*mask.shape, 4)
    np.testing.assert_allclose(np.asarray(labels.sum(-1))[np.asarray(mask)], 1.0, rtol=1e-6)
    taken = np.take_along_axis(np.asarray(labels), np.asarray(actions)[..., None], -1)[..., 0]
    assert (taken[np.asarray(mask)] > 0).all()  # the move taken is one the distribution allows
    assert (np.asarray(labels)[np.asarray(mask)].max(-1) < 1).any()  # ties between shortest paths


def test_discovery_trains_on_expert_labels_with_per_step_summaries_and_gate_noise(base):
    env = GridPinpad(solvable_only=False, horizon=40)
    meta = dataclasses.replace(META, summary_per_step=True, switch_noise=1.0)
    cfg = discovery.DiscoveryConfig(alphas=(0.1,), learning_rate=1e-2, batch_size=8, num_updates=40,
                                    updates_per_chunk=20, labels="expert")
    episodes = discovery.online_episodes(env, env.pretrain_params(), make_expert(env, 0.0), cfg.batch_size,
                                         expert_probabilities)
    state = discovery.init(jax.random.key(0), cfg, meta, "frozen", base)
    _, history = train(state, discovery.make_train_chunk(cfg, meta, base, 1, episodes), cfg.num_chunks)
    assert history[-1]["loss/alpha_0.1"] < history[0]["loss/alpha_0.1"]


def test_cotraining_trains_a_fresh_base_model_per_alpha(clean_data, base):
    cfg = discovery.DiscoveryConfig(alphas=(0.0, 1.0), learning_rate=1e-2, batch_size=8, num_updates=20,
                                    updates_per_chunk=10)

    def fresh_base(key):
        return Transformer(base.cfg, clean_data.obs.shape[-1], 4, grid_shape=base.grid_shape, rngs=nnx.Rngs(params=key))

    state = discovery.init(jax.random.key(0), cfg, META, "cotrained", fresh_base)
    before = host_copy(state.params.base)
    assert {leaf.shape[0] for leaf in jax.tree.leaves(before)} == {2}
    episodes = discovery.dataset_episodes(clean_data, cfg.batch_size)
    state, history = train(state, discovery.make_train_chunk(cfg, META, None, 1, episodes), cfg.num_chunks)
    assert history[-1]["action_nll/alpha_0"] < history[0]["action_nll/alpha_0"]
    after = host_copy(state.params.base)
    for part in ("embedding", "blocks", "action_head"):  # the unused observation head gets no gradient
        changed = jax.tree.map(lambda old, new: not np.array_equal(old, new), before[part], after[part])
        assert all(jax.tree.leaves(changed)), part


def test_the_beta_one_variant_switches_at_every_step(clean_data, base):
    cfg = discovery.DiscoveryConfig(alphas=(0.1,))
    state = discovery.init(jax.random.key(1), cfg, META, "beta1", base)
    _, heldout = split_episodes(clean_data, 0.25)
    metrics = jax.device_get(discovery.make_evaluate(cfg, base, 1, heldout)(state))
    assert metrics["mean_beta/alpha_0.1"] == 1.0
    assert metrics["intermediate_beta_share/alpha_0.1"] == 0.0
    assert metrics["recall/alpha_0.1"] == 1.0  # a switch at every step finds every boundary ...
    assert metrics["precision/alpha_0.1"] < 0.5  # ... among many switches that mark none


def test_switching_statistics_on_hand_made_episodes():
    subgoals = jnp.array([[0, 0, 0, 2, 2, 2, 1, 1, -1, -1], [3, 3, 3, 3, 0, 0, 0, 0, 0, 0]])
    mask = subgoals >= 0
    np.testing.assert_array_equal(subgoal_boundaries(subgoals, mask)[0], [0, 0, 0, 1, 0, 0, 1, 0, 0, 0])
    beta = jnp.array([
        [0.99, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0],  # boundary 3 hit one step late, 6 missed; padding ignored
        [1.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.02, 0.6],  # boundary 4 missed; switches at 2, 9 are false
    ])
    stats = jax.device_get(switching_statistics(beta, subgoals, mask))
    assert stats["precision"] == pytest.approx(1 / 3)  # of the switches after t = 0: 4 (hit), 2, 9
    assert stats["recall"] == pytest.approx(1 / 3)  # boundaries 3 (hit), 6, 4
    assert stats["f1"] == pytest.approx(1 / 3)
    assert stats["switches_per_episode"] == pytest.approx(5 / 2)  # the t = 0 switches count here
    assert stats["intermediate_beta_share"] == pytest.approx(2 / 18)  # 0.5 and 0.6 of 18 valid steps


def test_discovery_stages_through_the_cli_and_the_figures(runs_copy, capsys):
    runs, tiny = runs_copy
    for variant in ("frozen", "cotrained"):
        assert cli.main(["discover", "--runs-dir", str(runs), "--variant", variant, *tiny]) == 0
    assert "discovery: done" in capsys.readouterr().out
    for stage in ("discovery", "discovery_cotrained"):
        summary = RunDir(runs / "tiny" / stage / "seed_0").summary()
        assert summary["controlled_layer"] == 0  # L // 2 of the one-block tiny model
        assert set(summary["heldout_by_alpha"]) == {"0", "1"}
        for values in summary["heldout_by_alpha"].values():
            assert 0 <= values["f1"] <= 1 and values["heldout_kl"] >= 0 and values["heldout_action_nll"] > 0
        arrays = np.load(runs / "tiny" / stage / "seed_0" / DISCOVERY_ANALYSIS)
        assert arrays["beta"].shape == (2, *arrays["mask"].shape)
    figures = write_figures(runs, "tiny", [0])
    names = {figure.name for figure in figures}
    assert {"rate_distortion.png", "switching_gate.png"} <= names
