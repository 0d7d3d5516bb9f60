"""Behaviour cloning on real expert data, driven through the `hrl` command like a user would."""

import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hrl import cli
from hrl.algos import bc
from hrl.data.expert import load_dataset
from hrl.experiment import EXPERT_DATA, ExperimentConfig, run_collect
from hrl.infra.checkpoint import Checkpointer
from hrl.infra.config import load_config
from hrl.infra.metrics import read_metrics

# Small enough for seconds on a CPU; 20 chunks with a checkpoint after each, so that a kill
# after the first checkpoint lands in the middle of the run.
TINY = [
    "run.experiment=tiny", "env.solvable_only=false",  # rejection sampling of layouts compiles slowly
    "collect.num_episodes=64", "collect.num_episodes_clean=16", "collect.episodes_per_batch=64",
    "bc.hidden_sizes=[32]", "bc.batch_size=64", "bc.num_updates=200", "bc.updates_per_chunk=10",
    "bc.eval_episodes=8", "loop.checkpoint_every=1", "loop.eval_every=5", "loop.progress=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """A runs directory whose collect stage is complete (collection compiles for ~10 s: do it once)."""
    runs = tmp_path_factory.mktemp("collected")
    run_collect(load_config(ExperimentConfig, "gridworld/quick", TINY), runs)
    return runs


def runs_with_data(collected, path):
    """A fresh runs directory holding a copy of the complete collect stage, which is then skipped."""
    shutil.copytree(collected / "tiny" / "collect", path / "tiny" / "collect")
    return path


def bc_run_path(runs):
    return runs / "tiny" / "bc" / "seed_0"


def final_params(runs, config):
    like = bc.init(jax.random.key(0), config.bc, obs_dim=637, num_actions=4)
    step, state = Checkpointer(bc_run_path(runs) / "checkpoints").restore_latest(like)
    return step, state


def without_timing(records):
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "wall_time"} for r in records]


def test_bc_loss_goes_down_and_accuracy_beats_chance(collected):
    learns = ["bc.hidden_sizes=[128]", "bc.batch_size=128", "bc.learning_rate=3e-3", "bc.updates_per_chunk=100"]
    config = load_config(ExperimentConfig, "gridworld/quick", [*TINY, *learns])
    dataset = load_dataset(collected / "tiny" / "collect" / "seed_0" / EXPERT_DATA)
    state = bc.init(jax.random.key(0), config.bc, obs_dim=637, num_actions=4)
    train_chunk = bc.make_train_chunk(config.bc, dataset)
    history = []
    for _ in range(5):
        state, metrics = train_chunk(state)
        history.append(jax.device_get(metrics))
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    assert history[-1]["accuracy"] > 0.5  # 4 actions: chance is 0.25



def test_killed_train_bc_resumes_to_exactly_the_uninterrupted_result(collected, tmp_path):
    straight = runs_with_data(collected, tmp_path / "straight")
    assert cli.main(["train-bc", "--runs-dir", str(straight), *TINY]) == 0

    resumed = runs_with_data(collected, tmp_path / "resumed")
    command = [sys.executable, "-m", "hrl.cli", "train-bc", "--runs-dir", str(resumed), *TINY]
    checkpoints = bc_run_path(resumed) / "checkpoints"
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    assert not (bc_run_path(resumed) / "complete").exists(), "the kill came too late to test a resume"
    killed_at = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert killed_at < 200

    second = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "collect: complete, skipped" in second.stdout

    config = load_config(ExperimentConfig, "gridworld/quick", TINY)
    (step_a, params_a), (step_b, params_b) = final_params(straight, config), final_params(resumed, config)
    assert step_a == step_b == 200
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    records_a, records_b = read_metrics(bc_run_path(straight)), read_metrics(bc_run_path(resumed))
    assert [r["step"] for r in records_b] == list(range(10, 210, 10))  # nothing logged twice
    assert without_timing(records_b) == without_timing(records_a)  # bitwise-equal metrics
    evaluations = [r for r in records_b if "eval/success_rate" in r]
    assert [r["step"] for r in evaluations] == list(range(50, 250, 50))
    assert all(0 <= r["eval/success_rate"] <= 1 and r["eval/progress"] >= 0 for r in evaluations)

    scalars = {}
    for runs in (straight, resumed):
        accumulator = EventAccumulator(str(bc_run_path(runs)))
        accumulator.Reload()
        scalars[runs] = {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
                         for tag in ("loss", "accuracy", "eval/success_rate", "eval/progress")}
    assert [step for step, _ in scalars[resumed]["loss"]] == list(range(10, 210, 10))
    assert scalars[resumed] == scalars[straight]


def test_exploding_training_stops_with_a_message_and_keeps_the_last_good_checkpoint(collected, tmp_path, capsys):
    runs = runs_with_data(collected, tmp_path)
    code = cli.main(["train-bc", "--runs-dir", str(runs), *TINY, "bc.learning_rate=1e30", "bc.max_grad_norm=1e30"])
    assert code == 1
    message = capsys.readouterr().err.strip()
    assert message.startswith("hrl train-bc: training stopped: non-finite metric at step ")
    assert "loss=nan" in message and "Traceback" not in message
    bad_step = int(message.split("at step ")[1].split(":")[0])
    saved = Checkpointer(bc_run_path(runs) / "checkpoints").all_steps()
    assert all(step < bad_step for step in saved)
    if saved:
        assert f"last good checkpoint: step {saved[-1]}" in message
    assert not (bc_run_path(runs) / "complete").exists()


def test_config_errors_exit_2_with_one_line_and_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "hrl.cli", "train-bc", "--runs-dir", str(tmp_path), "bc.learning_rate=-1"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr == "hrl train-bc: error: bc.learning_rate: must be > 0, got -1.0\n"
    assert not (tmp_path / "gridworld_quick").exists()  # refused before any work


def test_a_finished_stage_is_skipped_and_a_changed_config_is_refused(collected, tmp_path, capsys):
    runs = runs_with_data(collected, tmp_path)
    short = [*TINY, "bc.num_updates=20"]
    assert cli.main(["train-bc", "--runs-dir", str(runs), *short]) == 0
    assert cli.main(["train-bc", "--runs-dir", str(runs), *short]) == 0
    assert "bc: complete, skipped" in capsys.readouterr().out

    assert cli.main(["train-bc", "--runs-dir", str(runs), *short, "bc.learning_rate=0.01"]) == 2
    assert "bc.learning_rate: 0.001 -> 0.01" in capsys.readouterr().err


def test_render_draws_an_episode_of_the_collected_data(collected, tmp_path, capsys):
    runs = runs_with_data(collected, tmp_path)
    output = tmp_path / "episode.gif"
    assert cli.main(["render", "--runs-dir", str(runs), "--episode", "3", "--output", str(output), *TINY]) == 0
    length = int(load_dataset(collected / "tiny" / "collect" / "seed_0" / EXPERT_DATA).lengths[3])
    with Image.open(output) as gif:
        assert gif.n_frames == length  # one frame per recorded step
    assert cli.main(["render", "--runs-dir", str(runs), "--episode", "64", *TINY]) == 2
    assert "--episode: must be in 0..63" in capsys.readouterr().err
