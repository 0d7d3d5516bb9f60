"""Linear probes on the frozen base model: they learn, the base stays bitwise untouched, the stage runs
through the CLI and makes its figure."""

import jax
import numpy as np
import pytest
from flax import nnx

from hrl import cli
from hrl.algos import probe
from hrl.analysis.figures import probe_accuracy_figure
from hrl.data.expert import load_dataset
from hrl.experiment import EXPERT_DATA
from hrl.infra.rundir import RunDir
from conftest import host_copy

NUM_SUBGOALS = 4


@pytest.fixture(scope="module")
def dataset(pretrained_runs):
    runs, _ = pretrained_runs
    return load_dataset(runs / "tiny" / "collect" / "seed_0" / EXPERT_DATA)




def test_probes_learn_and_leave_the_base_model_bitwise_unchanged(dataset, base):
    before = host_copy(nnx.state(base))
    cfg = probe.ProbeConfig(learning_rate=3e-2, batch_size=8, num_updates=40, updates_per_chunk=20)
    train, heldout = probe.split_episodes(dataset, cfg.heldout_fraction)
    state = probe.init(jax.random.key(2), cfg, base, NUM_SUBGOALS)

    # The train state holds the probes alone: nothing of the base model's size is optimised.
    probe_shapes = {(2, 16, 4), (2, 4)}  # (L + 1, width, subgoals), (L + 1, subgoals)
    assert {leaf.shape for leaf in jax.tree.leaves(state.params)} == probe_shapes
    assert {leaf.shape for leaf in jax.tree.leaves(state.opt_state)} <= probe_shapes | {(2,)}  # (2,): step counts

    # The loss over the whole training split (evaluate works on any episodes) starts at log 4.
    loss_on_train = probe.make_evaluate(cfg, base, train)
    start = jax.device_get(loss_on_train(state))
    train_chunk = probe.make_train_chunk(cfg, base, train)
    for _ in range(cfg.num_chunks):
        state, metrics = train_chunk(state)
    end = jax.device_get(loss_on_train(state))
    for layer in range(2):
        np.testing.assert_allclose(start[f"heldout_loss/layer_{layer}"], np.log(4), rtol=1e-5)
        assert end[f"heldout_loss/layer_{layer}"] < 0.95 * start[f"heldout_loss/layer_{layer}"]
        assert np.isfinite(metrics[f"loss/layer_{layer}"]) and 0 <= metrics[f"accuracy/layer_{layer}"] <= 1

    heldout_metrics = jax.device_get(probe.make_evaluate(cfg, base, heldout)(state))
    assert all(0 <= heldout_metrics[f"heldout_accuracy/layer_{layer}"] <= 1 for layer in range(2))
    jax.tree.map(np.testing.assert_array_equal, host_copy(nnx.state(base)), before)


def test_the_heldout_split_is_the_last_episodes(dataset):
    train, heldout = probe.split_episodes(dataset, 0.2)
    assert (train.num_episodes, heldout.num_episodes) == (25, 7)  # 20% of 32, rounded up
    np.testing.assert_array_equal(heldout.obs, dataset.obs[25:])
    with pytest.raises(ValueError, match="cannot hold out"):
        probe.split_episodes(jax.tree.map(lambda x: x[:1], dataset), 0.2)


def test_probe_stage_through_the_cli(runs_copy, capsys):
    runs, tiny = runs_copy
    assert cli.main(["probe", "--runs-dir", str(runs), *tiny]) == 0
    summary = RunDir(runs / "tiny" / "probe" / "seed_0").summary()
    assert set(summary["heldout_accuracy_by_layer"]) == {"0", "1"}
    assert all(0 <= value <= 1 for value in summary["heldout_accuracy_by_layer"].values())
    assert 0 < summary["heldout_chance_accuracy"] <= 1
    assert "probe: done" in capsys.readouterr().out
    assert cli.main(["probe", "--runs-dir", str(runs), *tiny]) == 0
    assert "probe: complete, skipped" in capsys.readouterr().out
    figure = probe_accuracy_figure(runs, "tiny", [0])
    assert figure == runs / "tiny" / "figures" / "probe_accuracy.png" and figure.stat().st_size > 0
