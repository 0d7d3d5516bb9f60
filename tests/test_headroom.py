"""The Bayes floor of the pretraining loss (hrl.analysis.headroom) on the tiny base model."""

import json

import jax
import numpy as np

from envs.grid_pinpad import GridPinpad
from hrl import cli
from hrl.analysis import headroom


def test_bayes_floor_is_exact_where_the_next_colour_is_set_and_below_an_untrained_model(base):
    # Redrawn layouts: the prior over doable tasks (the uniform prior is in test_pretrain.py).
    env = GridPinpad(horizon=40, solvable_only=True)  # the tiny base model's horizon
    records = jax.device_get(headroom.step_cross_entropies(base, env, 0.2, jax.random.key(0), 8))
    is_open = records["open"]
    assert is_open.any() and (~is_open).any()
    # The true task always keeps posterior mass: the floor never sees a label it ruled out.
    assert np.all(records["bayes"] < 5.0)
    # Once a pair's first colour is visited every task still possible goes on to its second, so the
    # posterior's average is the label itself and only the expert's ties are left.
    np.testing.assert_allclose(records["bayes"][~is_open], records["ties"][~is_open], atol=1e-5)
    # Where the next subgoal is open, guessing among the possible tasks costs more than the ties.
    assert records["bayes"][is_open].mean() > records["ties"][is_open].mean() + 0.05
    summary = headroom.summarise(records)
    assert summary["all/steps"] == summary["open/steps"] + summary["set/steps"] == is_open.size
    assert summary["all/model"] > summary["all/bayes"] + 0.3  # two updates of a one-block model


def test_the_bayes_policy_completes_any_task_episodes_the_untrained_model_fails(base):
    env = GridPinpad(horizon=40, solvable_only=True)
    success = headroom.closed_loop_success(base, env, 0.2, jax.random.key(1), 16)
    # Sampling the posterior-averaged expert and taking its own moves as evidence commits to one
    # doable task and walks its shortest paths: the ceiling a task-blind base model can reach.
    assert success["bayes"] == 1.0
    assert success["model"] < 0.5


def test_headroom_command_writes_its_summary_next_to_the_base_model(runs_copy, capsys):
    runs, tiny = runs_copy
    assert cli.main(["headroom", "--runs-dir", str(runs), "--sequences", "4", "--episodes", "8", *tiny]) == 0
    summary = json.loads((runs / "tiny" / "pretrain" / "seed_0" / "headroom.json").read_text())
    assert summary["sequences"] == 4 and summary["all/model"] > summary["all/bayes"] > 0
    # Uniform layouts here (env.solvable_only=false): some leave no pretraining task doable.
    assert summary["closed_loop/episodes"] == 8
    assert summary["closed_loop/bayes_success"] > summary["closed_loop/model_success"] >= 0
    assert "Bayes floor" in capsys.readouterr().out
    assert cli.main(["headroom", "--runs-dir", str(runs), "--sequences", "0", *tiny]) == 2
    assert cli.main(["headroom", "--runs-dir", str(runs), "--episodes", "0", *tiny]) == 2
    assert cli.main(["headroom", "--runs-dir", str(runs), *tiny, "pretrain.labels=taken"]) == 2
