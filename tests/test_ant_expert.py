"""The ant's expert: the "ant_expert" stage through `hrl train-expert` (a tiny PPO run on the real
MJX ant), its loader (Gaussian mean for D*, samples for D), the ant's collect stage (D and D* of
the 16 pretraining tasks with plain observations), and the grid's refusal.

Compilation of the MJX programs dominates the time, so the trained stage is a session fixture that
every test reads (a pytest worker builds it once, whatever other modules it runs in between), and
the ant's datasets are collected once."""

import shutil

import jax
import numpy as np
import pytest
import yaml

from envs import pinpad
from envs.ant_pinpad import NUM_JOINTS, OBS_DIM
from hrl import cli
from hrl.algos import ppo
from hrl.data.expert import load_dataset
from hrl.data.ppo_expert import policy_expert
from hrl.experiment import (
    EXPERT_DATA,
    EXPERT_DATA_CLEAN,
    ExperimentConfig,
    expert_env,
    load_ant_expert,
    run_ant_expert,
    run_collect,
    stage_config,
    stage_key,
)
from hrl.infra.checkpoint import Checkpointer
from hrl.infra.config import ConfigError, load_config
from hrl.infra.metrics import read_metrics

HORIZON = 20
# Seconds of running on a CPU (minutes of compiling): 8 ants x 8 steps per iteration, 2 iterations
# in chunks of 1, 2 evaluation episodes; short episodes and a handful of them for the datasets.
TINY = [
    "run.experiment=tiny_ant", f"env.horizon={HORIZON}",
    "ppo.num_envs=8", "ppo.unroll_length=8", "ppo.num_minibatches=2", "ppo.update_epochs=1",
    "ppo.num_iterations=2", "ppo.iterations_per_chunk=1", "ppo.hidden=[16]", "ppo.eval_episodes=2",
    "collect.num_episodes=8", "collect.num_episodes_clean=4", "collect.episodes_per_batch=4",
    "loop.checkpoint_every=1", "loop.eval_every=1", "loop.progress=false",
]  # fmt: skip
FINAL_STEP = 2  # iterations


@pytest.fixture(scope="session")
def config():
    return load_config(ExperimentConfig, "ant/quick", TINY)


@pytest.fixture(scope="session")
def expert_runs(tmp_path_factory):
    """A runs directory whose ant_expert stage was run by `hrl train-expert` (default preset ant/quick)."""
    runs = tmp_path_factory.mktemp("ant_runs")
    assert cli.main(["train-expert", "--runs-dir", str(runs), *TINY]) == 0
    return runs


@pytest.fixture(scope="session")
def datasets(expert_runs, config):
    """(D, D*) collected by the ant's collect stage, which loads the trained expert."""
    run = run_collect(config, expert_runs)
    return load_dataset(run.path / EXPERT_DATA), load_dataset(run.path / EXPERT_DATA_CLEAN)


def expert_dir(runs):
    return runs / "tiny_ant" / "ant_expert" / "seed_0"


def test_train_expert_writes_a_complete_run_and_skips_it_when_rerun(expert_runs, capsys):
    path = expert_dir(expert_runs)
    saved = yaml.safe_load((path / "config.yaml").read_text())
    assert list(saved) == ["seed", "env", "ppo"] and saved["ppo"]["num_envs"] == 8
    assert list(path.glob("events.out.tfevents.*")), "no TensorBoard events"
    rows = read_metrics(path)
    assert [row["step"] for row in rows] == [1, 2]
    assert all("eval/success_rate" in row and np.isfinite(row["loss/total"]) for row in rows)
    assert rows[-1]["env_steps"] == FINAL_STEP * 8 * 8
    with Checkpointer(path / "checkpoints") as checkpointer:
        assert checkpointer.all_steps() == [1, 2]
    summary = yaml.safe_load((path / "complete").read_text())  # JSON is YAML
    assert summary["env"] == "AntPinpadExpert-v0" and summary["env_steps"] == 128
    assert 0.0 <= summary["success_rate"] <= 1.0 and summary["resumed_from_step"] == 0
    assert 0.0 <= summary["posttrain_success_rate"] <= 1.0  # the denominator of the ant's Fig. 8b
    capsys.readouterr()
    assert cli.main(["train-expert", "--runs-dir", str(expert_runs), *TINY]) == 0
    assert "ant_expert: complete, skipped" in capsys.readouterr().out


def test_an_expert_run_without_its_completion_mark_resumes_from_its_checkpoint(expert_runs, config, tmp_path):
    """Reopened with the same config, the stage restores its last checkpoint instead of starting
    over (here the final one: nothing is left to run), keeps the logged metrics and completes."""
    shutil.copytree(expert_runs, tmp_path / "runs")
    path = expert_dir(tmp_path / "runs")
    (path / "complete").unlink()
    run = run_ant_expert(config, tmp_path / "runs")
    assert run.is_complete and run.summary()["resumed_from_step"] == FINAL_STEP
    assert run.summary()["env_steps"] == 128 and [row["step"] for row in read_metrics(path)] == [1, 2]
    resumed, straight = load_ant_expert(config, tmp_path / "runs"), load_ant_expert(config, expert_runs)
    jax.tree.map(np.testing.assert_array_equal, resumed.params, straight.params)


@pytest.fixture(scope="session")
def start(config):
    """The plain env, its params, and a reset state of it."""
    env = config.env.make()
    params = env.pretrain_params()
    _, state = jax.jit(env.reset)(jax.random.key(3), params)
    return env, params, state


def test_loader_gives_the_gaussian_mean_for_d_star_and_samples_for_d(expert_runs, config, start):
    env, params, state = start
    trained = load_ant_expert(config, expert_runs)
    privileged = expert_env(config)
    mean_expert = jax.jit(policy_expert(trained, privileged, sample=False))
    sampled_expert = jax.jit(policy_expert(trained, privileged, sample=True))
    key_a, key_b = jax.random.key(1), jax.random.key(2)

    mean = np.asarray(mean_expert(key_a, state, params))
    assert mean.shape == (NUM_JOINTS,)
    np.testing.assert_array_equal(mean, mean_expert(key_b, state, params))  # deterministic
    greedy = ppo.greedy_policy(trained)(privileged.observe(state, params))  # on the privileged observation
    np.testing.assert_allclose(mean, greedy, rtol=1e-6, atol=1e-7)

    sample_a = np.asarray(sampled_expert(key_a, state, params))
    np.testing.assert_array_equal(sample_a, sampled_expert(key_a, state, params))  # same key, same action
    assert np.abs(sample_a - np.asarray(sampled_expert(key_b, state, params))).min() > 0
    assert np.all(np.abs(sample_a) <= 1.0)
    # A sample is the mean plus std x the key's normal draw (where the clip into [-1, 1] left it).
    std = np.exp(np.asarray(trained.params["log_std"][...]))
    unclipped = np.abs(sample_a) < 1.0
    expected = (mean + std * np.asarray(jax.random.normal(key_a, (NUM_JOINTS,))))[unclipped]
    np.testing.assert_allclose(sample_a[unclipped], expected, rtol=1e-5, atol=1e-5)


def test_ant_collect_writes_plain_observations_labels_and_task_ids(datasets, expert_runs):
    for data, episodes in zip(datasets, (8, 4)):
        assert data.obs.shape == (episodes, HORIZON, OBS_DIM)  # ant-pinpad's 41, not the expert's 105
        assert data.actions.shape == (episodes, HORIZON, NUM_JOINTS) and np.all(np.abs(data.actions) <= 1.0)
        np.testing.assert_array_equal(data.mask.sum(1), data.lengths)
        assert set(np.unique(data.task_ids)) <= set(range(16))
        assert set(np.unique(data.subgoals[data.mask])) <= {-1, 0, 1, 2, 3}
        first_colours = [pinpad.ANT_PRETRAIN_TASKS[task][0] for task in data.task_ids]
        np.testing.assert_array_equal(data.subgoals[:, 0], first_colours)  # the label follows the task
    noisy, clean = datasets
    # An almost untrained actor's mean stays near 0 (std 0.12 here); its samples add noise of std
    # exp(init_log_std = -0.5) = 0.61 (0.55 here, after the clip).
    assert clean.actions[clean.mask].std() < 0.25 < noisy.actions[noisy.mask].std()
    saved = yaml.safe_load((expert_runs / "tiny_ant" / "collect" / "seed_0" / "config.yaml").read_text())
    assert list(saved) == ["seed", "env", "collect", "ppo"]  # the ant's data depend on the expert's training


def test_d_star_replays_the_mean_expert_on_its_first_step(datasets, expert_runs, config, start):
    """D*'s first observation and action follow from the collect stage's key and the loaded expert."""
    env, params, _ = start
    _, clean = datasets
    mean_expert = policy_expert(load_ant_expert(config, expert_runs), expert_env(config), sample=False)
    clean_key = jax.random.split(stage_key(config, "collect"))[1]
    keys = jax.random.split(jax.random.fold_in(clean_key, 0), 4)  # batch 0 of rollout_expert's keys

    @jax.jit
    def first_step(key):
        key_reset, key_steps = jax.random.split(key)
        obs, state = env.reset(key_reset, params)
        return obs, mean_expert(jax.random.split(jax.random.split(key_steps, HORIZON)[0])[0], state, params)

    obs, actions = jax.vmap(first_step)(keys)
    np.testing.assert_array_equal(np.asarray(obs), clean.obs[:, 0])
    np.testing.assert_allclose(np.asarray(actions), clean.actions[:, 0], rtol=1e-6, atol=1e-7)


def test_the_grid_refuses_train_expert_before_any_work(tmp_path, capsys):
    code = cli.main(["train-expert", "--preset", "gridworld/quick", "--runs-dir", str(tmp_path)])
    assert code == 2
    assert "env.name: 'GridPinpad-v0' has no privileged expert variant" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_ant_presets_and_the_unchanged_grid_stage_configs():
    paper = load_config(ExperimentConfig, "ant/paper")
    steps = paper.ppo.num_iterations * paper.ppo.env_steps_per_iteration
    assert paper.env.horizon == 500 and paper.ppo.num_envs == 4096 and 50e6 <= steps <= 100e6
    with pytest.raises(ConfigError, match=r"^collect\.epsilon: must be 0 for AntPinpad-v0"):
        load_config(ExperimentConfig, "ant/quick", ["collect.epsilon=0.1"])
    grid = load_config(ExperimentConfig, "gridworld/quick")
    assert list(stage_config(grid, "collect")) == ["seed", "env", "collect"]  # no ppo section for the grid
    assert "ppo" not in stage_config(grid, "pretrain")


def test_every_later_stage_runs_on_the_ant_through_its_preset(expert_runs, tmp_path, monkeypatch):
    """The grid's stage code on the ant, configured by ant/quick alone: the Hawk base pretrained on
    fresh episodes of the PPO expert, probes, full-rank controllers and metacontroller, internal RL
    and GRPO on continuous raw actions; `hrl pipeline ant` runs these (the discovery and RL
    ablations are the same code on other metacontrollers) without BC, a discrete-action baseline."""
    from hrl.algos import pretrain
    from hrl.experiment import (pipeline_stages, run_bc, run_controllers, run_discovery, run_grpo,
                                run_internal_rl, run_pretrain, run_probe)
    from hrl.infra.rundir import RunDir

    # Pretraining's closed-loop evaluation on the ant (tested in test_pretrain.py) would add a minute.
    monkeypatch.setattr(pretrain, "make_evaluate", lambda *args, **kwargs: lambda state: {})
    runs = tmp_path / "runs"
    shutil.copytree(expert_runs, runs)
    tiny = [
        *TINY, "model.num_layers=2", "model.width=16", "model.rnn_width=16", "model.mlp_width=32", f"model.max_len={HORIZON}",
        "pretrain.data=online", "pretrain.batch_size=2", "pretrain.num_updates=2", "pretrain.updates_per_chunk=2",
        "probe.batch_size=2", "probe.num_updates=2", "probe.updates_per_chunk=2",
        "controllers.layers=[1]", "controllers.batch_size=2", "controllers.num_updates=2",
        "controllers.updates_per_chunk=2", "controllers.eval_episodes=2", "discovery.alphas=[0.0]",
        "discovery.batch_size=2", "discovery.num_updates=2", "discovery.updates_per_chunk=2",
        "discovery.kl_warmup_updates=0", "internal_rl.alpha=0.0", "internal_rl.policy_width=8",
        "internal_rl.batch_size=4", "internal_rl.num_updates=1", "internal_rl.updates_per_chunk=1",
        "internal_rl.eval_episodes=2", "grpo.batch_size=4", "grpo.num_updates=1", "grpo.updates_per_chunk=1",
        "grpo.eval_episodes=2",
    ]  # fmt: skip
    config = load_config(ExperimentConfig, "ant/quick", tiny)
    assert config.controllers.rank == config.metacontroller.rank == 0  # full U (paper, ant)
    assert run_bc not in pipeline_stages(config) and run_discovery in {getattr(s, "func", s) for s in pipeline_stages(config)}
    with pytest.raises(ConfigError, match="discrete actions"):
        run_bc(config, runs)
    run_pretrain(config, runs)
    assert set(run_probe(config, runs).summary()["heldout_accuracy_by_layer"]) == {"0", "1", "2"}
    controllers = run_controllers(config, runs).summary()
    assert set(controllers["posttrain_success_by_layer"]) == {"1"}
    assert controllers["metrics"]["subgoal_start_nll/layer_1"] > 0
    (discovery,) = run_discovery(config, runs)
    assert set(discovery.summary()["heldout_by_alpha"]) == {"0"}
    for stage in (run_internal_rl(config, runs)[0], run_grpo(config, runs)[0]):
        summary = RunDir(stage.path).summary()
        assert summary["episodes"] == 4 and 0 <= summary["eval_success_rate"] <= 1


def test_the_rl_figure_divides_by_the_experts_post_training_success(tmp_path):
    from hrl.analysis.figures import expert_posttrain_success, rl_success_figure, success_band
    from hrl.infra.metrics import MetricsWriter
    from hrl.infra.rundir import RunDir

    def complete(stage, summary, curve=()):
        path = RunDir.path_for(tmp_path, "ant_quick", stage, 0)
        path.mkdir(parents=True)
        with MetricsWriter(path) as writer:
            for episodes, success in curve:
                writer.write(episodes, {"episodes": episodes, "success_rate": success})
        RunDir(path).mark_complete(summary)

    complete("internal_rl", {}, [(100, 0.1), (200, 0.35)])
    assert expert_posttrain_success(tmp_path, "ant_quick", [0]) is None  # no trained expert: success as it is
    complete("ant_expert", {"posttrain_success_rate": 0.7})
    assert expert_posttrain_success(tmp_path, "ant_quick", [0]) == 0.7
    band = success_band(tmp_path, "ant_quick", "internal_rl", [0], scale=0.7)
    np.testing.assert_allclose(band.median, [0.1 / 0.7, 0.5])
    assert band.num_seeds == 1
    assert rl_success_figure(tmp_path, "ant_quick", [0]).is_file()
