"""Random-policy throughput of gridworld-pinpad, and of two JAX gridworld peers, in env steps/s.

Protocol, the same for every environment: a batch of environments, reset once; then one jitted
call runs `--steps` batched steps in `lax.scan` with uniformly random actions and the
environment's own auto-reset, keeping the observations in the scan carry so that XLA cannot
skip computing them. The first call (compilation + one run) is timed on its own; the throughput
comes from the best of `--repeats` later calls, each continuing from the previous call's states.

Contenders:
- gridworld-pinpad with `envs.wrappers.VmapAutoReset` (the fast batched auto-reset), and with
  `jax.vmap(envs.wrappers.AutoReset)` for comparison (it computes a reset for every env at every step);
- navix "Navix-Empty-8x8-v0" (next-step auto-reset built into its `step`);
- xminigrid "MiniGrid-Empty-8x8" with its `GymAutoResetWrapper` (same-step).
The peers (the `[bench]` extra) run with a 100-step episode limit, like ours.

    python benchmarks/env_throughput.py --batch-sizes 256,1024,4096,16384 --output results.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import jax
import jax.numpy as jnp

HORIZON = 100


@dataclass
class Contender:
    """`init(key) -> carry` builds a batch of reset environments (the carry holds their
    observations); `step(carry, key) -> carry` takes one batched step with random actions."""

    name: str
    autoreset: str
    init: Callable
    step: Callable


@dataclass
class Measurement:
    env: str
    autoreset: str
    batch: int
    steps: int
    first_call_s: float  # compilation + one run
    best_run_s: float
    median_run_s: float
    steps_per_s: float


def random_actions(key, batch: int, num_actions: int) -> jax.Array:
    return jax.random.randint(key, (batch,), 0, num_actions, dtype=jnp.int32)


# --- contenders


def pinpad_vmap_autoreset(batch: int) -> Contender:
    from envs.grid_pinpad import GridPinpad
    from envs.wrappers import VmapAutoReset

    env = GridPinpad(horizon=HORIZON)
    params = env.default_params
    batched = VmapAutoReset(env, batch)

    def init(key):
        obs, states = batched.reset(jax.random.split(key, batch), params)
        return states, obs

    def step(carry, key):
        states, _ = carry
        key_act, key_env = jax.random.split(key)
        actions = random_actions(key_act, batch, env.action_space.n)
        obs, states, *_ = batched.step(jax.random.split(key_env, batch), states, actions, params)
        return states, obs

    return Contender("gridworld-pinpad", "VmapAutoReset", init, step)


def pinpad_vmapped_autoreset(batch: int) -> Contender:
    from envs.grid_pinpad import GridPinpad
    from envs.wrappers import AutoReset

    env = AutoReset(GridPinpad(horizon=HORIZON))
    params = env.default_params
    batched_reset = jax.vmap(env.reset, (0, None))
    batched_step = jax.vmap(env.step, (0, 0, 0, None))

    def init(key):
        obs, states = batched_reset(jax.random.split(key, batch), params)
        return states, obs

    def step(carry, key):
        states, _ = carry
        key_act, key_env = jax.random.split(key)
        actions = random_actions(key_act, batch, env.action_space.n)
        obs, states, *_ = batched_step(jax.random.split(key_env, batch), states, actions, params)
        return states, obs

    return Contender("gridworld-pinpad", "vmap(AutoReset)", init, step)


def navix_empty(batch: int) -> Contender:
    import navix

    env = navix.make("Navix-Empty-8x8-v0", max_steps=HORIZON)
    num_actions = len(env.action_set)

    def init(key):
        return jax.vmap(env.reset)(jax.random.split(key, batch))  # the timestep holds the observation

    def step(timestep, key):
        return jax.vmap(env.step)(timestep, random_actions(key, batch, num_actions))

    return Contender("navix Navix-Empty-8x8-v0", "built-in (next step)", init, step)


def xminigrid_empty(batch: int) -> Contender:
    import xminigrid
    from xminigrid.wrappers import GymAutoResetWrapper

    env, params = xminigrid.make("MiniGrid-Empty-8x8", max_steps=HORIZON)
    env = GymAutoResetWrapper(env)
    num_actions = env.num_actions(params)

    def init(key):
        return jax.vmap(env.reset, (None, 0))(params, jax.random.split(key, batch))

    def step(timestep, key):
        return jax.vmap(env.step, (None, 0, 0))(params, timestep, random_actions(key, batch, num_actions))

    return Contender("xminigrid MiniGrid-Empty-8x8", "GymAutoResetWrapper (same step)", init, step)


OURS = (pinpad_vmap_autoreset, pinpad_vmapped_autoreset)
PEERS = (navix_empty, xminigrid_empty)


# --- measurement


def measure(contender: Contender, batch: int, steps: int, repeats: int, seed: int = 0) -> Measurement:
    def rollout(carry, key):
        carry, _ = jax.lax.scan(lambda c, k: (contender.step(c, k), None), carry, jax.random.split(key, steps))
        return carry

    rollout = jax.jit(rollout)
    key = jax.random.key(seed)
    carry = jax.block_until_ready(jax.jit(contender.init)(key))

    start = time.perf_counter()
    carry = jax.block_until_ready(rollout(carry, jax.random.fold_in(key, 0)))
    first_call = time.perf_counter() - start

    runs = []
    for repeat in range(1, repeats + 1):
        start = time.perf_counter()
        carry = jax.block_until_ready(rollout(carry, jax.random.fold_in(key, repeat)))
        runs.append(time.perf_counter() - start)
    runs.sort()
    return Measurement(
        env=contender.name,
        autoreset=contender.autoreset,
        batch=batch,
        steps=steps,
        first_call_s=first_call,
        best_run_s=runs[0],
        median_run_s=runs[len(runs) // 2],
        steps_per_s=batch * steps / runs[0],
    )


def machine() -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    versions = {"jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib"), "python": platform.python_version()}
    for peer in ("navix", "xminigrid"):
        try:
            versions[peer] = importlib.metadata.version(peer)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "cpu": model,
        "cores_usable": len(os.sched_getaffinity(0)),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "versions": versions,
    }


def ratios(results: list[Measurement], peer: str) -> dict[int, float]:
    """ours (VmapAutoReset) / peer, per batch size measured for both."""
    ours = {m.batch: m.steps_per_s for m in results if m.autoreset == "VmapAutoReset"}
    theirs = {m.batch: m.steps_per_s for m in results if m.env.startswith(peer)}
    return {batch: ours[batch] / theirs[batch] for batch in sorted(ours.keys() & theirs.keys())}


def markdown_table(results: list[Measurement]) -> str:
    lines = [
        "| environment | auto-reset | batch | first call s (compile + run) | best run s | steps/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for m in results:
        lines.append(
            f"| {m.env} | {m.autoreset} | {m.batch} | {m.first_call_s:.2f} | {m.best_run_s:.4f} | "
            f"{m.steps_per_s / 1e6:.2f}M |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="256,1024,4096,16384", help="comma-separated")
    parser.add_argument("--steps", type=int, default=100, help="steps per jitted call (scan length)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls after the first; the best counts")
    parser.add_argument("--skip-peers", action="store_true", help="measure gridworld-pinpad only")
    parser.add_argument("--output", help="write the results as JSON to this path")
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if min(args.batch_sizes) < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("batch sizes, --steps and --repeats must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    contenders = OURS + (() if args.skip_peers else PEERS)
    results, skipped = [], {}
    for batch in args.batch_sizes:
        for make in contenders:
            try:
                contender = make(batch)
            except ImportError as err:
                print(f"skipping {make.__name__}: {err} (install the [bench] extra)", file=sys.stderr)
                skipped[make.__name__] = str(err)
                continue
            results.append(measure(contender, batch, args.steps, args.repeats))
            print(f"measured {contender.name} / {contender.autoreset} at batch {batch}", file=sys.stderr)

    print(markdown_table(results))
    summary = {peer: ratios(results, peer) for peer in ("xminigrid", "navix")}
    for peer, by_batch in summary.items():
        for batch, ratio in by_batch.items():
            print(f"\nours (VmapAutoReset) / {peer} at batch {batch}: {ratio:.2f}x", end="")
    print()
    if args.output:
        report = {
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "machine": machine(),
            "protocol": {"steps": args.steps, "repeats": args.repeats, "horizon": HORIZON},
            "results": [asdict(m) for m in results],
            "ratio_ours_over": {peer: {str(b): r for b, r in by_batch.items()} for peer, by_batch in summary.items()},
            "skipped": skipped,  # contender -> why (a peer that is not installed)
        }
        with open(args.output, "w") as out:
            json.dump(report, out, indent=2)


if __name__ == "__main__":
    main()
