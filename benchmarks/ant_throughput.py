"""Random-policy throughput of ant-pinpad on MJX against gymnasium's Ant-v5 (MuJoCo C), in env
steps/s (one env step = 5 physics steps in both), measured side by side in one run.

Protocol:
- ant-pinpad, two batched forms at `--batch` (512) environments, uniform random torques in
  [-1, 1], each environment auto-resetting in the same step:
  - "jit(vmap(scan(step)))": every environment runs its own `lax.scan` of `--steps` steps of
    `AutoReset(AntPinpad()).step`, vmapped over the batch (a reset is computed at every step
    under vmap);
  - "scan(VmapAutoReset)": one `lax.scan` of batched steps through `envs.wrappers.VmapAutoReset`,
    which resets only the environments whose episode ended (how the trainers step).
  Compilation is timed on its own (`jit(...).lower(...).compile()`); the throughput is
  batch x steps / the best of `--repeats` calls of the compiled function, each continuing from
  the previous call's states (observations kept in the output so XLA computes them).
- Ant-v5: `gymnasium.vector.SyncVectorEnv` of `--gym-envs` (8) `gymnasium.make("Ant-v5")`
  environments (same-step autoreset off: gymnasium's default next-step autoreset) with random
  actions from the action space, and one plain `Ant-v5`; `--gym-steps` steps each, best of
  `--repeats`.

    python benchmarks/ant_throughput.py --output ant.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax


def mjx_contenders(batch: int, steps: int):
    """{name: (compiled-later function, initial carry)} of the two batched forms."""
    from envs.ant_pinpad import AntPinpad
    from envs.wrappers import AutoReset, VmapAutoReset

    env = AntPinpad()
    params = env.default_params
    auto = AutoReset(env)
    action_shape = env.action_space.shape

    def per_env_rollout(state, key):
        def body(state, k):
            key_act, key_env = jax.random.split(k)
            action = jax.random.uniform(key_act, action_shape, minval=-1.0, maxval=1.0)
            obs, state, *_ = auto.step(key_env, state, action, params)
            return state, obs[0]

        return jax.lax.scan(body, state, jax.random.split(key, steps))

    def vmapped(states, key):
        return jax.vmap(per_env_rollout)(states, jax.random.split(key, batch))

    batched = VmapAutoReset(env, batch)

    def scanned(states, key):
        def body(states, k):
            key_act, key_env = jax.random.split(k)
            actions = jax.random.uniform(key_act, (batch,) + action_shape, minval=-1.0, maxval=1.0)
            obs, states, *_ = batched.step(jax.random.split(key_env, batch), states, actions, params)
            return states, obs[:, 0]

        return jax.lax.scan(body, states, jax.random.split(key, steps))

    _, states = jax.jit(batched.reset)(jax.random.split(jax.random.key(0), batch), params)
    return {"jit(vmap(scan(step)))": (vmapped, states), "scan(VmapAutoReset)": (scanned, states)}


def measure_mjx(name, fn, states, batch: int, steps: int, repeats: int) -> dict:
    key = jax.random.key(1)
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(states, key).compile()
    compile_s = time.perf_counter() - start
    states, _ = jax.block_until_ready(compiled(states, jax.random.fold_in(key, 0)))  # warm-up
    runs = []
    for repeat in range(1, repeats + 1):
        start = time.perf_counter()
        states, _ = jax.block_until_ready(compiled(states, jax.random.fold_in(key, repeat)))
        runs.append(time.perf_counter() - start)
    best = min(runs)
    return {"name": f"ant-pinpad MJX {name}", "batch": batch, "steps": steps, "compile_s": compile_s,
            "best_run_s": best, "steps_per_s": batch * steps / best}


def measure_gymnasium(num_envs: int, steps: int, repeats: int) -> list[dict]:
    import gymnasium

    results = []
    vec = gymnasium.vector.SyncVectorEnv([lambda: gymnasium.make("Ant-v5") for _ in range(num_envs)])
    vec.reset(seed=0)
    vec.action_space.seed(0)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            vec.step(vec.action_space.sample())
        runs.append(time.perf_counter() - start)
    results.append({"name": f"gymnasium Ant-v5 SyncVectorEnv({num_envs})", "batch": num_envs, "steps": steps,
                    "compile_s": 0.0, "best_run_s": min(runs), "steps_per_s": num_envs * steps / min(runs)})

    single = gymnasium.make("Ant-v5")
    single.reset(seed=0)
    single.action_space.seed(0)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps * num_envs // 4):
            _, _, terminated, truncated, _ = single.step(single.action_space.sample())
            if terminated or truncated:
                single.reset()
        runs.append(time.perf_counter() - start)
    results.append({"name": "gymnasium Ant-v5 single", "batch": 1, "steps": steps * num_envs // 4, "compile_s": 0.0,
                    "best_run_s": min(runs), "steps_per_s": steps * num_envs // 4 / min(runs)})
    return results


def machine() -> dict:
    import importlib.metadata

    model = "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    versions = {name: importlib.metadata.version(name) for name in ("jax", "jaxlib", "mujoco", "mujoco-mjx", "gymnasium")}
    return {"cpu": model, "cores_usable": len(os.sched_getaffinity(0)), "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "python": platform.python_version(), "versions": versions,
            "load_average_at_start": os.getloadavg()}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=100, help="scan length of one timed call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gym-envs", type=int, default=8)
    parser.add_argument("--gym-steps", type=int, default=500, help="vector steps per timed Ant-v5 run")
    parser.add_argument("--forms", default="vmap,scan",
                        help="batched forms of ant-pinpad to time: vmap (jit(vmap(scan(step)))), scan (scan(VmapAutoReset))")
    parser.add_argument("--skip-gymnasium", action="store_true")
    parser.add_argument("--output", help="write the results as JSON to this path")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    info = machine()
    results = []
    forms = {"vmap": "jit(vmap(scan(step)))", "scan": "scan(VmapAutoReset)"}
    chosen = [forms[form] for form in args.forms.split(",")]
    for name, (fn, states) in mjx_contenders(args.batch, args.steps).items():
        if name not in chosen:
            continue
        results.append(measure_mjx(name, fn, states, args.batch, args.steps, args.repeats))
        print(f"measured {results[-1]['name']}", file=sys.stderr)
    if not args.skip_gymnasium:
        results += measure_gymnasium(args.gym_envs, args.gym_steps, args.repeats)
    print("| contender | batch | compile s | best run s | env steps/s |\n|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['name']} | {r['batch']} | {r['compile_s']:.1f} | {r['best_run_s']:.3f} | {r['steps_per_s']:,.0f} |")
    reference = next((r["steps_per_s"] for r in results if "SyncVectorEnv" in r["name"]), None)
    if reference:
        for r in results[:len(chosen)]:
            print(f"{r['name']} / Ant-v5 SyncVectorEnv: {r['steps_per_s'] / reference:.2f}x")
    if args.output:
        with open(args.output, "w") as out:
            json.dump({"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "machine": info,
                       "results": results}, out, indent=2)


if __name__ == "__main__":
    main()
