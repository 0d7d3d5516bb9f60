"""The Bayes floor of the pretraining loss (hrl.analysis.headroom) on the tiny base model."""

import json

import jax
import jax.numpy as jnp
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


def test_a_wrong_colour_is_told_by_the_subgoal_done_and_the_one_stepped_onto():
    env = GridPinpad(horizon=40)
    params = env.pretrain_params(any_task=True)
    _, state = env.reset(jax.random.key(0), params)
    # Agent at the centre (cell 24); colours 0 and 1 to its right, colour 2 below colour 1, the
    # others on the top row, walls on the bottom row.
    state = state.replace(agent=jnp.int32(24), colour_cells=jnp.array([25, 26, 33, 0, 1, 2, 3, 4]),
                          wall_cells=jnp.array([42, 43, 44, 45]))
    watch = headroom.wrong_colour_watch(params)
    seen = []
    for action in (1, 1, 2):  # right onto colour 0, right onto 1 (subgoal A done), down onto 2
        _, next_state, *_ = env.step(None, state, jnp.int32(action), params)
        seen.append(np.asarray(watch(state, jnp.int32(action), next_state)).tolist())
        state = next_state
    # No pretraining task has B after A: the episode ends there, with the next subgoal open.
    assert seen == [[0, -1, -1], [0, -1, -1], [1, 0, 1]]


def test_the_failures_of_the_closed_loop_episodes_add_up(base):
    env = GridPinpad(horizon=40, solvable_only=True)
    key = jax.random.key(1)
    success = headroom.closed_loop_success(base, env, 0.2, key, 16)
    failures = headroom.closed_loop_failures(base, env, key, 16)
    assert sum(failures.values()) == round(16 * (1 - success["model"])) > 0
    assert all(kind in ("truncated", "wrong_colour_within_subgoal") or kind.split("->")[1] in "ABCD"
               for kind in failures)


def test_headroom_command_writes_its_summary_next_to_the_base_model(runs_copy, capsys):
    runs, tiny = runs_copy
    assert cli.main(["headroom", "--runs-dir", str(runs), "--sequences", "4", "--episodes", "8", *tiny]) == 0
    summary = json.loads((runs / "tiny" / "pretrain" / "seed_0" / "headroom.json").read_text())
    assert summary["sequences"] == 4 and summary["all/model"] > summary["all/bayes"] > 0
    # Uniform layouts here (env.solvable_only=false): some leave no pretraining task doable.
    assert summary["closed_loop/episodes"] == 8
    assert summary["closed_loop/bayes_success"] > summary["closed_loop/model_success"] >= 0
    assert sum(summary["closed_loop/model_failures"].values()) == round(8 * (1 - summary["closed_loop/model_success"]))
    assert "Bayes floor" in capsys.readouterr().out
    assert cli.main(["headroom", "--runs-dir", str(runs), "--sequences", "0", *tiny]) == 2
    assert cli.main(["headroom", "--runs-dir", str(runs), "--episodes", "0", *tiny]) == 2
    assert cli.main(["headroom", "--runs-dir", str(runs), *tiny, "pretrain.labels=taken"]) == 2
