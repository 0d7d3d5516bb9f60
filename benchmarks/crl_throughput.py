"""CRL gradient steps per second against network depth (the paper's cost of depth).

Protocol: build a preset's CRL state (its environment, batch size and widths) with the actor and
both encoders at depth d, prefill its buffer, then time a jitted `lax.scan` of `--updates`
gradient steps (each: sample a relabelled batch from the on-device buffer, then one critic, actor
and temperature update; no environment steps). The first call (compile + run) is timed apart
from the best of `--repeats` later calls. FLOPs of one step are the matmul FLOPs counted by hand
(`matmul_flops_per_step`): XLA's cost analysis counts a loop body once whatever its trip count,
and the residual blocks run in `lax.scan`, so it would see one block at every depth. The fraction
of peak divides the achieved FLOP/s by a float32 2048x2048 matmul measured in the same run.

    python benchmarks/crl_throughput.py --preset gridworld/crl_goal_paper --depths 4,16,64
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from hrl.algos import crl
from hrl.experiment import ExperimentConfig
from hrl.infra.config import load_config


def matmul_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    return 2 * size**3 / min(_timed(lambda: matmul(a).block_until_ready()) for _ in range(repeats))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def network_matmul_flops(rows: int, in_features: int, net, out_features: int) -> int:
    """Forward matmul FLOPs of a ResidualMLP on `rows` inputs: input layer, depth x width^2, head."""
    return 2 * rows * (in_features * net.width + net.depth * net.width**2 + net.width * out_features)


def matmul_flops_per_step(cfg: crl.CRLConfig, env) -> int:
    """One gradient step's matmul FLOPs; a backward pass counted as twice its forward pass.
    Critic: phi and psi on the batch, forward and backward. Actor: forward and backward on the
    batch, plus (discrete actions) phi on every action of every state and psi, forward only, or
    (continuous) phi and psi forward and backward into the sampled action."""
    coding = crl.action_coding(env)
    batch, rep = cfg.batch_size, cfg.representation_dim
    obs, goal = env.observation_space.shape[0], env.goal_space.shape[0]
    phi = network_matmul_flops(batch, obs + coding.critic_input, cfg.sa_encoder, rep)
    psi = network_matmul_flops(batch, goal, cfg.goal_encoder, rep)
    actor = network_matmul_flops(batch, obs + goal, cfg.actor, coding.policy_outputs)
    energies = phi * coding.size + psi if coding.discrete else 3 * (phi + psi)
    return 3 * (phi + psi) + 3 * actor + energies


def depth_overrides(depth: int) -> list[str]:
    return [f"crl.{net}.depth={depth}" for net in ("sa_encoder", "goal_encoder", "actor")]


def make_gradient_steps(cfg: crl.CRLConfig, env, num_steps: int):
    update = crl.make_update(cfg, env)

    def step(carry, key):
        learner, buffer = carry
        sample_key, update_key = jax.random.split(key)
        batch = crl.sample_transitions(buffer, sample_key, cfg.batch_size, cfg.discount, env.max_steps)
        learner, metrics = update(learner, batch, update_key)
        return (learner, buffer), metrics["critic/infonce"]

    @jax.jit
    def steps(learner, buffer, key):
        (learner, _), losses = jax.lax.scan(step, (learner, buffer), jax.random.split(key, num_steps))
        return learner, losses

    return steps


def measure(preset: str, depth: int, updates: int, repeats: int, peak: float, overrides: list[str] = ()) -> dict:
    config = load_config(ExperimentConfig, preset, [*overrides, *depth_overrides(depth)])
    cfg, env = config.crl, config.env.make()
    state = crl.init(jax.random.key(0), cfg, env, env.default_params)
    steps = make_gradient_steps(cfg, env, updates)
    key = jax.random.key(1)

    start = time.perf_counter()
    compiled = steps.lower(state.learner, state.buffer, key).compile()
    compile_s = time.perf_counter() - start
    flops = matmul_flops_per_step(cfg, env)
    first_s = _timed(lambda: jax.block_until_ready(compiled(state.learner, state.buffer, key)))
    best_s = min(_timed(lambda: jax.block_until_ready(compiled(state.learner, state.buffer, key)))
                 for _ in range(repeats))
    return {
        "preset": preset,
        "device": jax.devices()[0].device_kind,
        "depth": depth,
        "width": cfg.sa_encoder.width,
        "batch_size": cfg.batch_size,
        "obs_dim": env.observation_space.shape[0],
        "updates_per_call": updates,
        "compile_s": compile_s,
        "first_run_s": first_s,
        "best_run_s": best_s,
        "gradient_steps_per_s": updates / best_s,
        "matmul_gflop_per_step": flops / 1e9,
        "achieved_gflop_per_s": flops * updates / best_s / 1e9,
        "matmul_peak_gflop_per_s": peak / 1e9,
        "fraction_of_peak": flops * updates / best_s / peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gridworld/crl_goal_paper")
    parser.add_argument("--depths", default="4,16,64", help="comma-separated depths (multiples of 4)")
    parser.add_argument("--updates", type=int, default=20, help="gradient steps per timed call (one lax.scan)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first; the best counts")
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the preset (the depths override depth)")
    args = parser.parse_args()
    peak = matmul_peak_flops()
    results = []
    for depth in (int(d) for d in args.depths.split(",")):
        result = measure(args.preset, depth, args.updates, args.repeats, peak, args.overrides)
        results.append(result)
        print(json.dumps(result), flush=True)
    print("\n| depth | width | batch | compile s | gradient steps/s | matmul GFLOP/step | achieved GFLOP/s | fraction of peak |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['depth']} | {r['width']} | {r['batch_size']} | {r['compile_s']:.1f} | {r['gradient_steps_per_s']:.2f} "
              f"| {r['matmul_gflop_per_step']:.2f} | {r['achieved_gflop_per_s']:.1f} | {r['fraction_of_peak']:.1%} |")
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s on {results[0]['device']}")
    if args.output:
        with open(args.output, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
