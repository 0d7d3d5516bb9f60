"""Data-parallel scaling: pretraining tokens/s and internal-RL episodes/s on 1 and N devices.

Protocol: for each device count, a fresh Python with that many devices (on a CPU, XLA_FLAGS=
--xla_force_host_platform_device_count=N, set before jax starts) builds the two stages' real
`train_chunk` at a preset's sizes on freshly initialised networks: pretraining with the preset's
own batches (the quick preset: online expert episodes, packed), internal RL with its rollouts,
epochs and minibatches. One device runs without a mesh (exactly the single-device program); N
devices split the batch over a `hrl.infra.mesh` mesh. The first call (compile + run) is timed
apart from the best of `--repeats` later calls. One JSON line per (stage, devices).

On a CPU the N "devices" share the same cores: this measures the sharded program's overhead and
whatever XLA's per-device threads gain, not N real accelerators.

    python benchmarks/scaling.py --preset gridworld/quick --devices 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


STAGES = ("pretrain", "internal_rl")


def worker(preset: str, devices: int, pretrain_updates: int, rl_updates: int, repeats: int,
           overrides: list[str] = (), stages: tuple[str, ...] = STAGES) -> None:
    """Runs in the fresh Python: measure the stages on `devices` devices and print JSON lines."""
    import jax
    from flax import nnx

    from hrl.algos import internal_rl, pretrain
    from hrl.experiment import ExperimentConfig, init_pretrain_state, pretrain_batches
    from hrl.infra.config import load_config
    from hrl.infra.mesh import MeshConfig, build_mesh, replicate
    from hrl.models.metacontroller import Metacontroller
    from rl_throughput import timed_chunks  # benchmarks/ is this script's directory, first on sys.path

    config = load_config(ExperimentConfig, preset, [
        f"pretrain.updates_per_chunk={pretrain_updates}", f"pretrain.num_updates={pretrain_updates}",
        f"internal_rl.updates_per_chunk={rl_updates}", f"internal_rl.num_updates={rl_updates}", *overrides])
    # >=: on accelerators the mesh takes the first `devices` of them; on a CPU the flag makes exactly that many.
    assert jax.device_count() >= devices, f"asked for {devices} devices, jax sees {jax.device_count()}"
    mesh = build_mesh(MeshConfig(devices=devices))
    env = config.env.make()
    state = init_pretrain_state(config, env, jax.random.key(0))
    if "pretrain" in stages:
        if config.pretrain.data != "online":
            raise SystemExit("this benchmark times the online pretraining batches (no collected dataset needed)")
        chunk = pretrain.make_train_chunk(config.pretrain, pretrain_batches(config, None, env), mesh)
        first, best = timed_chunks(chunk, replicate(state, mesh), repeats)
        tokens = config.pretrain.batch_size * env.max_steps * pretrain_updates
        _report(preset, "pretrain", devices, first, best, pretrain_updates, tokens_per_s=tokens / best)
    if "internal_rl" not in stages:
        return

    base = state.module()
    metacontroller = Metacontroller(config.metacontroller, base.cfg.width, rngs=nnx.Rngs(params=jax.random.key(1)))
    layer = config.discovery.controlled_layer(base.num_layers)
    abstract_env = internal_rl.AbstractActionEnv(env, env.posttrain_params(), base, metacontroller, layer)
    cfg = config.internal_rl
    chunk = internal_rl.make_train_chunk(cfg, abstract_env, mesh)
    first, best = timed_chunks(chunk, replicate(internal_rl.init(jax.random.key(2), cfg, abstract_env), mesh), repeats)
    _report(preset, "internal_rl", devices, first, best, rl_updates, episodes_per_s=cfg.batch_size * rl_updates / best)


def _report(preset: str, stage: str, devices: int, first: float, best: float, updates: int, **rate: float) -> None:
    import jax

    print(json.dumps({"preset": preset, "stage": stage, "devices": devices, "device_kind": jax.devices()[0].device_kind,
                      "updates_per_call": updates, "first_call_s": round(first, 3), "best_call_s": round(best, 3),
                      **{name: round(value, 1) for name, value in rate.items()}}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gridworld/quick")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2], help="device counts, one fresh Python each")
    parser.add_argument("--pretrain-updates", type=int, default=10, help="pretraining updates per timed call")
    parser.add_argument("--rl-updates", type=int, default=2, help="internal-RL updates per timed call")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after the first; the best counts")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated, of " + ", ".join(STAGES))
    parser.add_argument("--output", help="write the rows (one per stage and device count) as JSON here")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the preset (e.g. smaller sizes)")
    args = parser.parse_args()
    stages = tuple(args.stages.split(","))
    if not set(stages) <= set(STAGES):
        parser.error(f"--stages: choose from {', '.join(STAGES)}")
    if args.worker is not None:
        worker(args.preset, args.worker, args.pretrain_updates, args.rl_updates, args.repeats, args.overrides, stages)
        return
    rows = []
    for devices in args.devices:
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
        command = [sys.executable, __file__, "--worker", str(devices), "--preset", args.preset, "--pretrain-updates",
                   str(args.pretrain_updates), "--rl-updates", str(args.rl_updates), "--repeats", str(args.repeats),
                   "--stages", args.stages, *args.overrides]
        worker_run = subprocess.run(command, env={**os.environ, "XLA_FLAGS": flags}, check=True, stdout=subprocess.PIPE,
                                    text=True)
        print(worker_run.stdout, end="", flush=True)
        rows += [json.loads(line) for line in worker_run.stdout.splitlines() if line.startswith("{")]
    if args.output:
        with open(args.output, "w") as file:
            json.dump(rows, file, indent=2)


if __name__ == "__main__":
    main()
