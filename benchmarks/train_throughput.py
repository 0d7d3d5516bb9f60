"""Training throughput of the base-model pretraining update, against the machine's matmul peak.

Protocol: build the pretraining `train_chunk` of a preset's model and batch size (a jitted
`lax.scan` of `--updates` AdamW updates on a synthetic expert-like dataset of the same shapes,
every episode as long as the horizon, so no padding is cropped: the worst case),
time its first call (compile + run) apart from the best of `--repeats` later calls, and report
tokens/s (episodes x time steps per update / time per update). The FLOPs of one update come
from XLA's own cost analysis of the compiled program; the fraction of peak divides the achieved
FLOP/s by the float32 matmul peak measured in the same run (a 2048x2048 matmul, best of 5).

    python benchmarks/train_throughput.py --preset gridworld/quick
    python benchmarks/train_throughput.py --preset gridworld/paper --updates 10   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from hrl.algos import pretrain
from hrl.data.expert import Dataset
from hrl.experiment import ExperimentConfig, init_pretrain_state
from hrl.infra.config import load_config


def matmul_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = min(_timed(lambda: matmul(a).block_until_ready()) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def synthetic_dataset(num_episodes: int, horizon: int, obs_dim: int) -> Dataset:
    """Expert-like shapes and sparsity (13 ones per observation); the values do not matter for speed."""
    rng = np.random.default_rng(0)
    obs = np.zeros((num_episodes, horizon, obs_dim), np.uint8)
    ones = rng.integers(0, obs_dim, (num_episodes, horizon, 13))
    np.put_along_axis(obs, ones, 1, axis=-1)
    lengths = np.full(num_episodes, horizon, np.int32)
    return Dataset(
        obs=obs,
        actions=rng.integers(0, 4, (num_episodes, horizon)).astype(np.int32),
        mask=np.ones((num_episodes, horizon), bool),
        subgoals=np.zeros((num_episodes, horizon), np.int32),
        task_ids=np.zeros(num_episodes, np.int32),
        lengths=lengths,
        success=np.ones(num_episodes, bool),
    )


def gradient_flops(state, cfg, sample_batch) -> float:
    """FLOPs of one update's loss and gradient, by XLA's cost analysis (the optimiser's few
    element-wise FLOPs are left out). Counted outside the scan: XLA's analysis counts a loop's
    body once, whatever its trip count."""
    batch = sample_batch(jax.random.key(0))
    gradient = jax.grad(lambda params: pretrain.objective(params, state.graphdef, batch, cfg)[0])
    analysis = jax.jit(gradient).lower(state.params).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis["flops"])


def measure(preset: str, updates: int, repeats: int, overrides: list[str] = ()) -> dict:
    config = load_config(ExperimentConfig, preset, [f"pretrain.updates_per_chunk={updates}",
                                                     f"pretrain.num_updates={updates}", *overrides])
    env = config.env.make()
    cfg = config.pretrain
    dataset = synthetic_dataset(max(cfg.batch_size, 256), env.max_steps, env.observation_space.shape[0])
    state = init_pretrain_state(config, env, jax.random.key(0))
    sample_batch = pretrain.dataset_batches(dataset, cfg.batch_size, env.action_space.n)
    train_chunk = pretrain.make_train_chunk(cfg, sample_batch)

    start = time.perf_counter()
    compiled = train_chunk.lower(state).compile()
    compile_s = time.perf_counter() - start
    flops_per_update = gradient_flops(state, cfg, sample_batch)
    first_s = _timed(lambda: jax.block_until_ready(compiled(state)))
    best_s = min(_timed(lambda: jax.block_until_ready(compiled(state))) for _ in range(repeats))

    tokens_per_update = cfg.batch_size * env.max_steps
    peak = matmul_peak_flops()
    achieved = flops_per_update * updates / best_s
    return {
        "preset": preset,
        "device": jax.devices()[0].device_kind,
        "model": {k: getattr(config.model, k) for k in ("num_layers", "width", "num_heads", "mlp_width")},
        "batch_episodes": cfg.batch_size,
        "sequence_length": env.max_steps,
        "updates_per_call": updates,
        "compile_s": compile_s,
        "first_run_s": first_s,
        "best_run_s": best_s,
        "updates_per_s": updates / best_s,
        "tokens_per_s": tokens_per_update * updates / best_s,
        "gflop_per_update": flops_per_update / 1e9,
        "achieved_gflop_per_s": achieved / 1e9,
        "matmul_peak_gflop_per_s": peak / 1e9,
        "fraction_of_peak": achieved / peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gridworld/quick")
    parser.add_argument("--updates", type=int, default=20, help="updates per timed call (one lax.scan)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first; the best counts")
    parser.add_argument("--output", help="write the result as JSON here")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the preset (e.g. smaller sizes)")
    args = parser.parse_args()
    result = measure(args.preset, args.updates, args.repeats, args.overrides)
    for name, value in result.items():
        print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}")
    if args.output:
        with open(args.output, "w") as file:
            json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
