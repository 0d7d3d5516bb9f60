"""Episodes per second of internal RL and of raw-action GRPO: rollouts and updates together.

Protocol: build each stage's `train_chunk` at a preset's sizes (base model, metacontroller, policy,
batch, epochs and minibatches) on freshly initialised networks, time its first call (compile +
run) apart from the best of `--repeats` later calls, and report training episodes per second.
Trained weights would give the same figure: both rollouts scan the whole horizon whatever the
episodes do (an ended episode's steps are computed and discarded), so the work per episode is
fixed by the shapes.

    python benchmarks/rl_throughput.py --preset gridworld/quick
    python benchmarks/rl_throughput.py --preset gridworld/paper --updates 2   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import time

import jax
from flax import nnx

from hrl.algos import grpo, internal_rl
from hrl.experiment import ExperimentConfig, init_pretrain_state
from hrl.infra.config import load_config
from hrl.models.metacontroller import Metacontroller


def timed_chunks(train_chunk, state, repeats: int) -> tuple[float, float]:
    """(seconds of the first call: compile and run, best seconds of the later calls)."""
    start = time.perf_counter()
    state, metrics = train_chunk(state)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    return first, best_call_seconds(train_chunk, state, repeats)


def best_call_seconds(train_chunk, state, repeats: int) -> float:
    """The fastest of `repeats` timed calls, each chunk run on the previous one's state."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = train_chunk(state)
        jax.block_until_ready(metrics)
        best = min(best, time.perf_counter() - start)
    return best


def measure(preset: str, updates: int, repeats: int, overrides: list[str] = ()) -> list[dict]:
    config = load_config(ExperimentConfig, preset, [f"internal_rl.updates_per_chunk={updates}",
                                                     f"internal_rl.num_updates={updates}",
                                                     f"grpo.updates_per_chunk={updates}", f"grpo.num_updates={updates}",
                                                     *overrides])
    env = config.env.make()
    base = init_pretrain_state(config, env, jax.random.key(0)).module()
    metacontroller = Metacontroller(config.metacontroller, base.cfg.width, rngs=nnx.Rngs(params=jax.random.key(1)))
    layer = config.discovery.controlled_layer(base.num_layers)
    abstract_env = internal_rl.AbstractActionEnv(env, env.posttrain_params(), base, metacontroller, layer)
    stages = {
        "internal_rl": (config.internal_rl, internal_rl.make_train_chunk(config.internal_rl, abstract_env),
                        internal_rl.init(jax.random.key(2), config.internal_rl, abstract_env)),
        "grpo": (config.grpo, grpo.make_train_chunk(config.grpo, base, env, env.posttrain_params()),
                 grpo.init(jax.random.key(2), config.grpo, base)),
    }
    rows = []
    for name, (cfg, train_chunk, state) in stages.items():
        first, best = timed_chunks(train_chunk, state, repeats)
        episodes = updates * cfg.batch_size
        rows.append({"stage": name, "preset": preset, "batch_size": cfg.batch_size, "updates": updates,
                     "epochs": cfg.epochs, "minibatches": cfg.minibatches, "compile_and_first_s": round(first, 2),
                     "chunk_s": round(best, 3), "episodes_per_s": round(episodes / best, 1),
                     "env_steps_per_s": round(episodes * env.max_steps / best)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gridworld/quick")
    parser.add_argument("--updates", type=int, default=5, help="updates per timed chunk (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed chunks after the first (default: %(default)s)")
    parser.add_argument("--output", help="write the rows as JSON here")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the preset (e.g. smaller sizes)")
    args = parser.parse_args()
    print(f"devices: {jax.devices()}", flush=True)
    rows = measure(args.preset, args.updates, args.repeats, args.overrides)
    if args.output:
        with open(args.output, "w") as file:
            json.dump(rows, file, indent=2)


if __name__ == "__main__":
    main()
