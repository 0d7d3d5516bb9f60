"""Training throughput of the stages that the other benchmarks do not time: behaviour cloning,
probes, supervised controllers, discovery (frozen base and co-trained) and the ant's PPO expert.

(Pretraining: train_throughput.py; internal RL and GRPO: rl_throughput.py; CRL: crl_throughput.py.)

Protocol, the same for every stage: build the stage's own jitted `train_chunk` at a preset's sizes
on freshly initialised networks (a fresh base model where a stage reads the pretrained one: the
work per update is fixed by the shapes, not by the weights), with `--updates` updates per call;
compile it ahead of time as the training loop does (`lower(state).compile()`, timed apart), then
take the best of `--repeats` calls after one untimed call. Batches come
from where the preset says: fresh expert episodes inside the jitted update for `data: online`,
otherwise a synthetic dataset of D's shapes in which every episode lasts the whole horizon (the
worst case: a real D* is cropped to its longest episode). Rates: updates/s, and the samples one
update consumes per second (episodes for the sequence stages, steps for BC's MLP, environment
steps for PPO, whose "update" is one iteration: an unroll of every environment, then its epochs).

    python benchmarks/stage_throughput.py --preset gridworld/quick --ant-preset ant/quick
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import jax

from envs.experts import make_expert
from hrl.algos import bc, controllers, discovery, ppo, probe
from hrl.experiment import ExperimentConfig, discovery_base, expert_env, init_pretrain_state
from hrl.infra.config import load_config
from rl_throughput import best_call_seconds  # benchmarks/ is this script's directory, first on sys.path
from train_throughput import synthetic_dataset

GRID_STAGES = ("bc", "probe", "controllers", "discovery", "discovery_cotrained")
STAGES = GRID_STAGES + ("ant_expert",)


def _chunk_overrides(section: str, updates: int, chunk_key: str = "updates_per_chunk",
                     total_key: str = "num_updates") -> list[str]:
    return [f"{section}.{chunk_key}={updates}", f"{section}.{total_key}={updates}"]


def build_grid_stage(stage: str, config: ExperimentConfig) -> tuple[Callable, object, int, str]:
    """(train_chunk, initial state, samples per update, what a sample is) of one gridworld stage."""
    env = config.env.make()
    key = jax.random.key(0)
    if stage == "bc":
        cfg = config.bc
        dataset = synthetic_dataset(max(cfg.batch_size, 256), env.max_steps, env.observation_space.shape[0])
        state = bc.init(key, cfg, obs_dim=env.observation_space.shape[0], num_actions=env.action_space.n)
        return bc.make_train_chunk(cfg, dataset), state, cfg.batch_size, "steps"
    base = init_pretrain_state(config, env, key).module()
    if stage == "probe":
        cfg = config.probe
        dataset = synthetic_dataset(max(cfg.batch_size, 256), env.max_steps, env.observation_space.shape[0])
        state = probe.init(key, cfg, base, env.num_subgoals)
        return probe.make_train_chunk(cfg, base, dataset), state, cfg.batch_size, "episodes"
    if stage == "controllers":
        cfg = config.controllers
        layers = cfg.swept_layers(base.num_layers)
        dataset = synthetic_dataset(max(cfg.batch_size, 256), env.max_steps, env.observation_space.shape[0])
        state = controllers.init(key, cfg, base, len(layers), env.num_subgoals)
        if cfg.data == "online":
            episodes = controllers.online_episodes(env, env.pretrain_params(), make_expert(env, 0.0), cfg.batch_size)
        else:
            episodes = controllers.dataset_episodes(dataset, cfg.batch_size)
        chunk = controllers.make_train_chunk(cfg, base, layers, episodes)
        return chunk, state, cfg.batch_size, "episodes"
    if stage in ("discovery", "discovery_cotrained"):
        cfg, variant = config.discovery, "cotrained" if stage == "discovery_cotrained" else "frozen"
        if variant == "cotrained":
            frozen_base, make_base = discovery_base(config, None, variant)  # needs no run directory
        else:
            frozen_base, make_base = base, base
        if cfg.data == "online":
            episodes = discovery.online_episodes(env, env.pretrain_params(), make_expert(env, 0.0), cfg.batch_size)
        else:
            dataset = synthetic_dataset(max(cfg.batch_size, 256), env.max_steps, env.observation_space.shape[0])
            episodes = discovery.dataset_episodes(dataset, cfg.batch_size)
        layer = cfg.controlled_layer(config.model.num_layers)
        state = discovery.init(key, cfg, config.metacontroller, variant, make_base)
        chunk = discovery.make_train_chunk(cfg, config.metacontroller, frozen_base, layer, episodes)
        return chunk, state, cfg.batch_size, f"episodes (x {len(cfg.alphas)} alphas)"
    raise ValueError(f"unknown stage {stage!r}")


def build_ant_expert(config: ExperimentConfig) -> tuple[Callable, object, int, str]:
    env = expert_env(config)
    params = env.pretrain_params()
    cfg = config.ppo
    state = ppo.init(jax.random.key(0), cfg, env, params)
    return ppo.make_train_chunk(cfg, env, params, state.graphdef), state, cfg.num_envs * cfg.unroll_length, "env steps"


def measure(stage: str, preset: str, overrides: list[str], updates: int, repeats: int) -> dict:
    if stage == "ant_expert":
        config = load_config(ExperimentConfig, preset, _chunk_overrides("ppo", updates, "iterations_per_chunk",
                                                                        "num_iterations") + overrides)
        chunk, state, samples, unit = build_ant_expert(config)
    else:
        section = "discovery" if stage.startswith("discovery") else stage
        config = load_config(ExperimentConfig, preset, _chunk_overrides(section, updates) + overrides)
        chunk, state, samples, unit = build_grid_stage(stage, config)
    compile_s, best = compiled_chunk_seconds(chunk, state, repeats)
    return {"stage": stage, "preset": preset, "device": jax.devices()[0].device_kind, "updates_per_call": updates,
            "samples_per_update": samples, "sample": unit, "compile_s": round(compile_s, 3),
            "best_call_s": round(best, 4), "updates_per_s": round(updates / best, 2),
            "samples_per_s": round(samples * updates / best, 1)}


def compiled_chunk_seconds(train_chunk, state, repeats: int) -> tuple[float, float]:
    """(compile seconds, best seconds of `repeats` calls). Compiled ahead of time for the initial
    state, like the training loop: calling the jitted function again could retrace when a chunk
    returns a state whose weak types differ from the initial one's (the metacontroller's does)."""
    start = time.perf_counter()
    compiled = train_chunk.lower(state).compile()
    compile_s = time.perf_counter() - start
    state, metrics = compiled(state)  # untimed: first-call costs (allocation, thread pools)
    jax.block_until_ready(metrics)
    return compile_s, best_call_seconds(compiled, state, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gridworld/quick", help="preset of the gridworld stages")
    parser.add_argument("--ant-preset", default="ant/quick", help="preset of the ant expert's PPO")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    parser.add_argument("--updates", type=int, default=10, help="updates (PPO: iterations) per timed call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first; the best counts")
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the gridworld preset")
    parser.add_argument("--ant-override", action="append", default=[], help="key=value override of the ant preset")
    args = parser.parse_args()
    stages = args.stages.split(",")
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    results = []
    for stage in stages:
        ant = stage == "ant_expert"
        results.append(measure(stage, args.ant_preset if ant else args.preset,
                               args.ant_override if ant else args.overrides, args.updates, args.repeats))
        print(json.dumps(results[-1]), flush=True)
    if args.output:
        with open(args.output, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
