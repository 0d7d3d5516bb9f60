"""The device mesh: a training chunk with its batch split over 2 CPU devices gives the
single-device losses and parameters (pretraining, discovery, internal RL, behaviour cloning, CRL,
PPO), the mesh config is validated, and 2 processes joined by jax.distributed train a tiny stage
leaving one set of logs.

The pytest process has already started jax with one device, so every multi-device check runs
in a fresh Python (this file run as a script) with the device count set before jax starts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# float32 sums taken in another order on 2 devices, through a few Adam steps at a large learning rate
TOLERANCE = dict(rtol=1e-3, atol=1e-4)
ADAM_NOISE = 0.02  # of the chunk's largest parameter change (internal RL, one AVX-512 CPU: 0.007)


def run_script(*args: str, devices: int = 2, extra_env: dict | None = None, timeout: int = 240,
               wait: bool = True):
    """This file as a script in a fresh Python with `devices` CPU devices. XLA's backend
    optimisations are off: they halve the compile time and change no sharding (both sides of every
    comparison are compiled alike)."""
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), **(extra_env or {})}
    command = [sys.executable, __file__, *args]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


# --- single process, 2 devices


def test_a_sharded_chunk_gives_the_single_device_losses_and_parameters():
    """One fresh Python with 2 devices checks every algorithm: one jax start, and one test rather
    than one per algorithm, which the pytest workers would split and so start twice. It also
    refuses a batch that the devices do not divide."""
    lines = [line for line in run_script("equivalence", timeout=480).splitlines() if line.startswith("{")]
    reports = {report["algorithm"]: report for report in map(json.loads, lines)}
    assert reports.pop("indivisible")["error"].startswith("mesh.devices: must divide the batch")
    assert sorted(reports) == sorted(["pretrain", "discovery", "internal_rl", "bc", "crl", "ppo"])
    for algorithm, report in reports.items():
        assert report["devices"] == 2 and report["params_devices"] == 2, algorithm  # the state is on both
        assert report["batch_sharded"] and report["all_reduce"], algorithm  # the batch really is split
        assert report["metrics_close"] and report["params_close"], report
        assert report["params_changed"], algorithm  # the comparison is of a state that trained


def test_the_mesh_config_is_validated_and_one_device_means_no_mesh():
    from hrl.infra.config import ConfigError
    from hrl.infra.mesh import MeshConfig, build_mesh, shard_batch

    with pytest.raises(ConfigError, match="devices: must be >= 0"):
        MeshConfig(devices=-1).validate()
    with pytest.raises(ConfigError, match="mesh.devices: must be <= the 1 available"):
        build_mesh(MeshConfig(devices=2))
    assert build_mesh(MeshConfig()) is None and build_mesh(MeshConfig(devices=0)) is None
    batch = {"x": object()}
    assert shard_batch(batch, None) is batch  # no mesh: not even a copy


def test_mesh_is_an_experiment_setting_that_no_stage_records():
    from hrl.experiment import STAGE_SECTIONS, ExperimentConfig
    from hrl.infra.config import ConfigError, load_config

    config = load_config(ExperimentConfig, "gridworld/quick", ["mesh.devices=4"])
    assert config.mesh.devices == 4
    assert not any("mesh" in sections for sections in STAGE_SECTIONS.values())
    with pytest.raises(ConfigError, match="mesh.devices"):
        load_config(ExperimentConfig, "gridworld/quick", ["mesh.devices=-2"])


# --- 2 processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_tiny_stages_and_leave_one_set_of_logs(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    processes = [run_script("multihost", str(tmp_path), devices=1, wait=False,
                            extra_env={"JAX_COORDINATOR_ADDRESS": address, "HRL_NUM_PROCESSES": "2",
                                       "HRL_PROCESS_ID": str(index)})
                 for index in range(2)]
    outputs = [process.communicate(timeout=240)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-5000:]
    reports = [json.loads(line) for output in outputs for line in output.splitlines() if line.startswith("{")]
    assert sorted(report["process"] for report in reports) == [0, 1]
    assert all(report["global_devices"] == 2 and report["local_devices"] == 1 for report in reports)
    run = tmp_path / "tiny" / "pretrain" / "seed_0"
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [2, 4]  # once per chunk, not once per process
    # Both loops computed the logged loss: one global computation, not two runs.
    assert reports[0]["loss"] == reports[1]["loss"] == records[-1]["loss"]
    assert (run / "complete").is_file() and (run / "config.yaml").is_file()
    for seed in (0, 1):  # several seeds over the mesh: one after another
        assert (tmp_path / "tiny" / "grpo" / f"seed_{seed}" / "complete").is_file()
    assert not list(run.glob("*.tmp"))
    assert sorted(path.name for path in (run / "checkpoints").iterdir() if path.name.isdigit()) == ["2", "4"]


# ----------------------------------------------------------------------------------------------
# What the fresh Pythons run


def _equivalence() -> None:
    import jax

    from hrl.infra.mesh import MeshConfig, build_mesh

    mesh = build_mesh(MeshConfig(devices=2))
    for algorithm, make in (("pretrain", _pretrain_case), ("discovery", _discovery_case),
                            ("internal_rl", _internal_rl_case), ("bc", _bc_case), ("crl", _crl_case),
                            ("ppo", _ppo_case)):
        start = time.perf_counter()
        state, make_chunk, *selected = make()
        report = _compare(state, make_chunk, mesh, *selected)
        print(json.dumps({"algorithm": algorithm, "devices": jax.device_count(), **report,
                          "seconds": time.perf_counter() - start}), flush=True)
    print(json.dumps({"algorithm": "indivisible", "error": _indivisible_error(mesh)}), flush=True)


def _compare(state, make_chunk, mesh, trained=lambda state: state.params, compared=lambda state: ()) -> dict:
    """One chunk without and with the mesh, from the same state. `trained(state)`: the parameters
    (which must change); `compared(state)`: more of the state that must come out the same (an
    algorithm's environments and replay buffer)."""
    import jax
    import numpy as np

    from hrl.infra.mesh import replicate

    single_state, single_metrics = make_chunk(None)(state)
    sharded_input = replicate(state, mesh)
    lowered = make_chunk(mesh).lower(sharded_input)
    compiled = lowered.compile()
    sharded_state, sharded_metrics = compiled(sharded_input)
    metrics = [(np.asarray(single_metrics[name]), np.asarray(sharded_metrics[name])) for name in single_metrics]
    initial, single, sharded = (jax.tree.leaves(jax.device_get(trained(s))) for s in (state, single_state, sharded_state))
    # Adam turns a gradient's float noise into a step of up to the learning rate, so the trained
    # parameters may differ by a small share of how far the chunk moved them; a batch split wrongly
    # would differ by about all of it.
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(single, initial))
    trained_close = [np.allclose(a, b, rtol=TOLERANCE["rtol"], atol=max(TOLERANCE["atol"], ADAM_NOISE * moved))
                     for a, b in zip(single, sharded)]
    others = zip(jax.tree.leaves(jax.device_get(compared(single_state))), jax.tree.leaves(jax.device_get(compared(sharded_state))))
    return {"metrics_close": all(np.allclose(a, b, **TOLERANCE) for a, b in metrics),
            "worst_metric": max(float(np.max(np.abs(a - b))) for a, b in metrics),
            "params_close": all(trained_close) and all(np.allclose(a, b, **TOLERANCE) for a, b in others),
            "worst_param": max(float(np.max(np.abs(a - b))) for a, b in zip(single, sharded)), "moved": moved,
            "params_devices": len(jax.tree.leaves(trained(sharded_state))[0].sharding.device_set),
            "batch_sharded": '{"batch"}' in lowered.as_text(),  # the constraint is in the program
            "all_reduce": "all-reduce" in compiled.as_text(),  # and XLA split the work across devices
            "params_changed": moved > 0}


TINY_MODEL = dict(num_layers=1, width=16, num_heads=2, mlp_width=32, max_len=16)
HORIZON = 16


def _tiny_env():
    from envs.grid_pinpad import GridPinpad

    return GridPinpad(horizon=HORIZON)


def _tiny_base(env):
    import jax
    from flax import nnx

    from hrl.models.transformer import Transformer, TransformerConfig

    return Transformer(TransformerConfig(**TINY_MODEL), env.observation_space.shape[0], env.action_space.n,
                       rngs=nnx.Rngs(params=jax.random.key(3)))


def _random_episodes(key, batch_size: int, obs_dim: int = 637, num_actions: int = 4):
    """Random binary observations, actions and episode lengths: a batch to fit, cheap to compile
    (the samplers of the stages are tested in their own files; here only the split matters)."""
    import jax
    import jax.numpy as jnp

    obs_key, action_key, length_key = jax.random.split(key, 3)
    obs = jax.random.bernoulli(obs_key, 0.1, (batch_size, HORIZON, obs_dim)).astype(jnp.uint8)
    actions = jax.random.randint(action_key, (batch_size, HORIZON), 0, num_actions)
    lengths = jax.random.randint(length_key, (batch_size, 1), 4, HORIZON + 1)
    return obs, actions, jnp.arange(HORIZON) < lengths


def _pretrain_case(batch_size: int = 8):
    import jax

    from hrl.algos import pretrain
    from hrl.models.transformer import TransformerConfig

    cfg = pretrain.PretrainConfig(learning_rate=1e-2, batch_size=batch_size, num_updates=3, updates_per_chunk=3)

    def sample(key):
        obs, actions, mask = _random_episodes(key, batch_size)
        return pretrain.Batch(obs, jax.nn.one_hot(actions, 4), mask)

    state = pretrain.init(jax.random.key(1), cfg, TransformerConfig(**TINY_MODEL), 637, 4)
    return state, lambda mesh: pretrain.make_train_chunk(cfg, sample, mesh)


def _discovery_case():
    import jax

    from hrl.algos import discovery
    from hrl.models.metacontroller import MetacontrollerConfig

    base = _tiny_base(_tiny_env())
    meta = MetacontrollerConfig(history_size=8, summary_size=8, encoder_hidden=16, switch_hidden=8,
                                decoder_hidden=8, rank=4)
    cfg = discovery.DiscoveryConfig(alphas=(0.0, 0.3), learning_rate=1e-2, batch_size=8, num_updates=3,
                                    updates_per_chunk=3)
    state = discovery.init(jax.random.key(0), cfg, meta, "frozen", base)
    episodes = lambda key: _random_episodes(key, cfg.batch_size)  # noqa: E731
    return state, lambda mesh: discovery.make_train_chunk(cfg, meta, base, 1, episodes, mesh)


def _internal_rl_case():
    import jax
    from flax import nnx

    from envs import grid_pinpad, pinpad
    from hrl.algos import internal_rl
    from hrl.models.metacontroller import Metacontroller, MetacontrollerConfig

    env = _tiny_env()
    base = _tiny_base(env)
    meta = Metacontroller(MetacontrollerConfig(), base.cfg.width, rngs=nnx.Rngs(params=jax.random.key(5)))
    # Any first colour is a success: the untrained base succeeds in some episodes, not all, so
    # the advantages are not all 0 and the policy moves.
    colours = range(grid_pinpad.NUM_COLOURS)
    tasks = pinpad.make_task_set([(c,) for c in colours], colours, grid_pinpad.MAX_TASK_LEN, grid_pinpad.NUM_COLOURS)
    params = pinpad.PinpadParams(tasks=tasks, any_task=jax.numpy.asarray(True))
    abstract_env = internal_rl.AbstractActionEnv(env, params, base, meta, 1)
    cfg = internal_rl.InternalRLConfig(policy_width=16, batch_size=16, minibatches=2, epochs=2, updates_per_chunk=2,
                                       num_updates=2, learning_rate=1e-2)
    state = internal_rl.init(jax.random.key(0), cfg, abstract_env)
    return state, lambda mesh: internal_rl.make_train_chunk(cfg, abstract_env, mesh)


def _bc_case():
    import types

    import jax

    from hrl.algos import bc

    cfg = bc.BCConfig(hidden_sizes=(16,), learning_rate=1e-2, batch_size=8, num_updates=3, updates_per_chunk=3)
    dataset = types.SimpleNamespace(**dict(zip(("obs", "actions", "mask"), _random_episodes(jax.random.key(2), 8))))
    state = bc.init(jax.random.key(0), cfg, 637, 4)
    return state, lambda mesh: bc.make_train_chunk(cfg, dataset, mesh)


def _crl_case():
    """8 goal-reaching grids, a buffer of 64 steps each: the environments, the buffer and the
    relabelled batches split over the devices."""
    import jax

    from envs.grid_goal import GridGoal
    from hrl.algos import crl
    from hrl.models.resnet import ResNetConfig

    net = ResNetConfig(depth=4, width=16, layer_norm=False)
    cfg = crl.CRLConfig(num_envs=8, unroll_length=4, updates_per_iteration=2, batch_size=16, num_iterations=2,
                        iterations_per_chunk=2, buffer_steps=64, prefill_steps=0, representation_dim=8,
                        critic_learning_rate=1e-2, actor_learning_rate=1e-2, alpha_learning_rate=1e-2,
                        sa_encoder=net, goal_encoder=net, actor=net)
    env = GridGoal(horizon=20)
    state = jax.jit(lambda key: crl.init(key, cfg, env, env.default_params))(jax.random.key(0))  # faster than eager
    return (state, lambda mesh: crl.make_train_chunk(cfg, env, env.default_params, mesh),
            lambda state: (state.learner.critic_params, state.learner.actor_params, state.learner.log_alpha),
            lambda state: (state.learner, state.collector, state.buffer))


def _ppo_case():
    """PPO on test_ppo's point mass: 8 environments and minibatches of 16 steps split over the devices."""
    import jax

    from hrl.algos import ppo
    from test_ppo import PointMass

    cfg = ppo.PPOConfig(num_envs=8, unroll_length=4, num_minibatches=2, update_epochs=2, num_iterations=2,
                        iterations_per_chunk=2, learning_rate=1e-2, hidden=(16, 16))
    env = PointMass()
    state = ppo.init(jax.random.key(0), cfg, env, env.default_params)
    return (state, lambda mesh: ppo.make_train_chunk(cfg, env, env.default_params, state.graphdef, mesh),
            lambda state: state.params, lambda state: (state.obs_stats, state.env_states, state.obs))


def _indivisible_error(mesh) -> str | None:
    """A batch of 3 on 2 devices: refused with the key to change, not split unevenly."""
    from hrl.infra.config import ConfigError
    from hrl.infra.mesh import replicate

    state, make_chunk = _pretrain_case(batch_size=3)
    try:
        make_chunk(mesh)(replicate(state, mesh))
    except ConfigError as error:
        return str(error)
    return None


def _multihost(runs_dir: str) -> None:
    """Process `HRL_PROCESS_ID` of 2: join the other, run the tiny pretraining stage with the
    batch split over both processes' devices, print what its own host loop computed; then a
    second pretrained seed and GRPO for both seeds over the same mesh."""
    from hrl.infra.mesh import initialize_distributed

    assert initialize_distributed()  # before anything else touches jax
    import jax

    from hrl import experiment
    from hrl.algos import pretrain
    from hrl.infra.config import load_config
    from conftest import TINY_BASE

    pretrain.make_evaluate = lambda *args, **kwargs: lambda state: {}  # as in conftest: not under test here
    results = []
    run_training = experiment.run_training  # kept as is; only its result is recorded, per process
    experiment.run_training = lambda *args, **kwargs: results.append(run_training(*args, **kwargs)) or results[-1]
    overrides = [*TINY_BASE, "pretrain.num_updates=4", "pretrain.batch_size=4", "mesh.devices=0",
                 "loop.checkpoint_every=1"]
    config = load_config(experiment.ExperimentConfig, "gridworld/quick", overrides)
    experiment.run_pretrain(config, runs_dir)
    loss = results[0].summary["metrics"]["loss"]
    # Several seeds of a stage over the mesh (one after another), as `hrl pipeline` runs them.
    experiment.run_pretrain(experiment.with_seed(config, 1), runs_dir)
    experiment.run_grpo(config, runs_dir, seeds=[0, 1])
    print(json.dumps({"process": jax.process_index(), "global_devices": jax.device_count(),
                      "local_devices": jax.local_device_count(), "loss": loss}), flush=True)


if __name__ == "__main__":
    {"equivalence": _equivalence, "multihost": _multihost}[sys.argv[1]](*sys.argv[2:])
