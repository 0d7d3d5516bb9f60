"""Fixtures shared by the tests of the stages that read a pretrained base model (probe, controllers, discovery)."""

import getpass
import os
import platform
import shutil
import tempfile
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest

from hrl.algos import pretrain
from hrl.data.expert import load_dataset
from hrl.experiment import EXPERT_DATA_CLEAN, ExperimentConfig, load_base_model, run_collect, run_pretrain
from hrl.infra.config import load_config

# Most of the suite's time is XLA compiling tiny programs. Without the backend's optimisations it
# compiles about 30% faster (the ant's stages: 170 s -> 122 s); the few tests that run long take
# longer, the suite less (with the cache below, CI's pytest went from 847 s to 625 s). Set before
# jax starts its backend, which it does at the first computation.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()


def host_cpu_fingerprint() -> str:
    """A hash of the CPU's feature flags. XLA compiles for the host's instruction set, but jax's
    cache key leaves it out: entries written on another CPU load with a warning that they may
    crash (SIGILL), as happened here with a temporary directory restored on a new machine."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.platform() + platform.processor()
    return f"{zlib.crc32(flags.encode()):08x}"


# Several tests build the same tiny stages, on two pytest workers. A persistent compilation cache
# shared by the workers compiles each program once (JAX keys it by the program, the compile options
# and its own version; the directory's name adds the CPU). One run of the suite fills about 50 MB;
# jax's size cap would need the filelock package, and without it jax reads no entry at all.
CACHE_DIR = Path(tempfile.gettempdir()) / f"hrl-tests-jax-cache-{getpass.getuser()}-{host_cpu_fingerprint()}"
jax.config.update("jax_compilation_cache_dir", str(CACHE_DIR))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# Seconds on a CPU: short episodes, a one-block transformer, a few updates of each stage. epsilon 0
# makes D and D* come from one expert, so that their collection compiles once.
TINY_BASE = [
    "run.experiment=tiny", "env.solvable_only=false", "env.horizon=40",
    "collect.num_episodes=32", "collect.num_episodes_clean=16", "collect.episodes_per_batch=32",
    "collect.epsilon=0.0",
    "model.num_layers=1", "model.width=16", "model.num_heads=2", "model.mlp_width=32", "model.max_len=40",
    "pretrain.num_updates=2", "pretrain.updates_per_chunk=2", "pretrain.eval_episodes=2",
    "probe.batch_size=8", "probe.num_updates=4", "probe.updates_per_chunk=2",
    "controllers.batch_size=8", "controllers.num_updates=4", "controllers.updates_per_chunk=2",
    "controllers.eval_episodes=4",
    "discovery.alphas=[0.0,1.0]", "discovery.batch_size=8", "discovery.num_updates=4",
    "discovery.updates_per_chunk=2", "discovery.kl_delay_updates=0", "internal_rl.alpha=0.0",
    "internal_rl.policy_width=16", "internal_rl.batch_size=8", "internal_rl.num_updates=2",
    "internal_rl.updates_per_chunk=1", "internal_rl.eval_episodes=4",
    "grpo.batch_size=8", "grpo.num_updates=2", "grpo.updates_per_chunk=1", "grpo.eval_episodes=4",
    "loop.progress=false",
]  # fmt: skip


@pytest.fixture(scope="session")
def pretrained_runs(tmp_path_factory):
    """(runs directory whose collect and pretrain stages are complete, the overrides that made it)."""
    runs = tmp_path_factory.mktemp("pretrained")
    with pytest.MonkeyPatch.context() as patch:
        # Pretraining's closed-loop evaluation (tested in test_pretrain.py) would double the time.
        patch.setattr(pretrain, "make_evaluate", lambda *args, **kwargs: lambda state: {})
        config = load_config(ExperimentConfig, "gridworld/quick", TINY_BASE)
        run_collect(config, runs)  # D and D* (the quick preset pretrains on fresh episodes instead of D)
        run_pretrain(config, runs)
    return runs, list(TINY_BASE)


@pytest.fixture
def runs_copy(pretrained_runs, tmp_path):
    """A private copy of the pretrained runs directory, for tests that add stages to it."""
    runs, tiny = pretrained_runs
    shutil.copytree(runs, tmp_path / "runs")
    return tmp_path / "runs", tiny


@pytest.fixture(scope="session")
def base(pretrained_runs):
    """The tiny pretrained base model."""
    runs, tiny = pretrained_runs
    return load_base_model(load_config(ExperimentConfig, "gridworld/quick", tiny), runs).module()


@pytest.fixture(scope="session")
def clean_data(pretrained_runs):
    """The tiny run's D*."""
    runs, _ = pretrained_runs
    return load_dataset(runs / "tiny" / "collect" / "seed_0" / EXPERT_DATA_CLEAN)


def host_copy(tree):
    """A copy in host memory, to compare a model's parameters before and after training."""
    return jax.tree.map(np.array, tree)
