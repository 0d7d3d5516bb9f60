"""The experiment-wide config schema and what each stage of the pipeline depends on.

One YAML preset (configs/<env>/<preset>.yaml) fills this schema; each algorithm keeps its own
section's dataclass in its own file. A stage's run directory records only the sections its
outputs depend on (`stage_config`), so changing `bc.learning_rate` leaves the collected data
valid, while changing `collect.num_episodes` makes a stale BC run refuse to resume.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx

import envs
from envs.base import Discrete
from envs.experts import (make_expert, make_expert_distribution, make_labelled_expert,
                          make_subgoal_start_labeller, make_task_blind_labelled_expert)

from hrl.algos import bc, controllers, crl, discovery, grpo, internal_rl, ppo, pretrain, probe
from hrl.algos.bc import BCConfig
from hrl.algos.controllers import ControllerConfig
from hrl.algos.crl import CRLConfig
from hrl.algos.discovery import DiscoveryConfig
from hrl.algos.grpo import GRPOConfig
from hrl.algos.internal_rl import InternalRLConfig
from hrl.algos.ppo import PPOConfig
from hrl.algos.pretrain import PretrainConfig
from hrl.algos.probe import ProbeConfig
from hrl.data import expert, ppo_expert
from hrl.data.expert import CollectConfig
from hrl.infra.config import ConfigError, check
from hrl.infra.loop import LoopConfig, TrainResult, run_training, run_training_seeds, stack_seeds, vmap_seeds
from hrl.infra.mesh import MeshConfig, build_mesh
from hrl.infra.rundir import RunDir
from hrl.infra.train_state import TrainState
from hrl.models.metacontroller import MetacontrollerConfig
from hrl.models.backbones import ModelConfig, make_model


@dataclasses.dataclass
class RunConfig:
    experiment: str = "gridworld_quick"  # runs/<experiment>/<stage>/seed_<k>/
    seed: int = 0  # the root of every key of every stage

    def validate(self) -> None:
        check(bool(self.experiment) and "/" not in self.experiment, "experiment",
              "must be a non-empty name without '/'", self.experiment)
        check(self.seed >= 0, "seed", "must be >= 0", self.seed)


@dataclasses.dataclass
class EnvConfig:
    name: str = "GridPinpad-v0"  # a name registered in `envs`
    horizon: int = 100  # steps before truncation (paper: 100)
    solvable_only: bool = True  # redraw layouts in which the task cannot be completed

    def validate(self) -> None:
        check(self.name in envs.registered(), "name", f"must be one of {envs.registered()}", self.name)
        check(self.horizon >= 1, "horizon", "must be >= 1", self.horizon)

    def make(self) -> envs.Env:
        return envs.make(self.name, horizon=self.horizon, solvable_only=self.solvable_only)


@dataclasses.dataclass
class ExperimentConfig:
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    env: EnvConfig = dataclasses.field(default_factory=EnvConfig)
    collect: CollectConfig = dataclasses.field(default_factory=CollectConfig)
    bc: BCConfig = dataclasses.field(default_factory=BCConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)  # the base model: transformer or hawk
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    probe: ProbeConfig = dataclasses.field(default_factory=ProbeConfig)
    controllers: ControllerConfig = dataclasses.field(default_factory=ControllerConfig)
    metacontroller: MetacontrollerConfig = dataclasses.field(default_factory=MetacontrollerConfig)
    discovery: DiscoveryConfig = dataclasses.field(default_factory=DiscoveryConfig)
    internal_rl: InternalRLConfig = dataclasses.field(default_factory=InternalRLConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    crl: CRLConfig = dataclasses.field(default_factory=CRLConfig)
    ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)  # the ant's expert (stage 'ant_expert')
    loop: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)  # devices the batch is split over; no stage records it

    def validate(self) -> None:
        check(self.model.max_len >= self.env.horizon, "model.max_len",
              f"must be >= env.horizon ({self.env.horizon}) so rollouts fit the cache", self.model.max_len)
        env = self.env.make()
        num_tasks = env.pretrain_params().tasks.size if hasattr(env, "pretrain_params") else 1  # goal reaching has none
        check(self.bc.eval_task < num_tasks, "bc.eval_task", f"must be < {num_tasks} (pretraining tasks)",
              self.bc.eval_task)
        check(all(layer <= self.model.num_layers for layer in self.controllers.layers), "controllers.layers",
              f"must be layers of the base model, 0..{self.model.num_layers}", self.controllers.layers)
        check(self.discovery.layer is None or self.discovery.layer <= self.model.num_layers, "discovery.layer",
              f"must be a layer of the base model, 0..{self.model.num_layers}", self.discovery.layer)
        check(self.internal_rl.alpha in self.discovery.alphas, "internal_rl.alpha",
              f"must be one of discovery.alphas {list(self.discovery.alphas)} (the metacontroller it uses)",
              self.internal_rl.alpha)
        grid_only = env.name == "GridPinpad-v0"  # progress as colour pairs, and the task posterior, are the grid's
        check(self.pretrain.boundary_weight == 1 or grid_only, "pretrain.boundary_weight",
              f"must be 1 on {env.name}: subgoal boundaries are gridworld-pinpad's colour pairs",
              self.pretrain.boundary_weight)
        check(self.pretrain.own_episodes == 0 or grid_only, "pretrain.own_episodes",
              f"must be 0 on {env.name}: their labels are gridworld-pinpad's task posterior",
              self.pretrain.own_episodes)
        check(self.controllers.own_episodes == 0 or grid_only, "controllers.own_episodes",
              f"must be 0 on {env.name}: their labeller, D*'s expert, acts on the ant's privileged state",
              self.controllers.own_episodes)
        check(self.controllers.counterfactual_weight == 0 or grid_only, "controllers.counterfactual_weight",
              f"must be 0 on {env.name}: its labels are gridworld-pinpad's shortest paths to each subgoal",
              self.controllers.counterfactual_weight)
        check_collect_fits_expert(self)


# The config sections each stage's outputs depend on, upstream stages' sections included.
# `loop` (checkpoint and evaluation cadence, progress display) changes no final number, so a run
# may be resumed with other loop settings.
STAGE_SECTIONS = {
    "collect": ("env", "collect"),
    "bc": ("env", "collect", "bc"),
    "pretrain": ("env", "collect", "model", "pretrain"),
    "probe": ("env", "collect", "model", "pretrain", "probe"),
    "controllers": ("env", "collect", "model", "pretrain", "controllers"),
    "controllers_oracle": ("env", "collect", "model", "pretrain", "controllers"),
    "discovery": ("env", "collect", "model", "pretrain", "metacontroller", "discovery"),
    "discovery_beta1": ("env", "collect", "model", "pretrain", "metacontroller", "discovery"),
    "discovery_cotrained": ("env", "collect", "model", "metacontroller", "discovery"),  # no pretrained base
    "internal_rl": ("env", "collect", "model", "pretrain", "metacontroller", "discovery", "internal_rl"),
    "internal_rl_beta1": ("env", "collect", "model", "pretrain", "metacontroller", "discovery", "internal_rl"),
    "internal_rl_cotrained": ("env", "collect", "model", "metacontroller", "discovery", "internal_rl"),
    "grpo": ("env", "collect", "model", "pretrain", "grpo"),
    "crl": ("env", "crl"),  # no pretrained model: CRL learns from its own experience
    "ant_expert": ("env", "ppo"),  # the PPO expert of an env with a privileged variant (the ant)
}

# The stage of each discovery variant (hrl.algos.discovery.VARIANTS).
DISCOVERY_STAGES = {"frozen": "discovery", "beta1": "discovery_beta1", "cotrained": "discovery_cotrained"}
# The internal-RL stage on each discovery variant's metacontroller.
INTERNAL_RL_STAGES = {"frozen": "internal_rl", "beta1": "internal_rl_beta1", "cotrained": "internal_rl_cotrained"}


def stage_config(config: ExperimentConfig, stage: str) -> dict[str, Any]:
    """What a stage's run directory records and compares on resume."""
    sections = STAGE_SECTIONS[stage] + expert_sections(config, stage)
    return {"seed": config.run.seed, **{name: getattr(config, name) for name in sections}}


def stage_key(config: ExperimentConfig, stage: str) -> jax.Array:
    """An independent key per stage, from the seed: a stage's randomness ignores other stages' settings."""
    return jax.random.fold_in(jax.random.key(config.run.seed), zlib.crc32(stage.encode()))


# ----------------------------------------------------------------------------------------------
# Stages. Each opens its run directory (refusing a different config), skips itself when complete,
# and reads upstream outputs from upstream run directories, running an incomplete upstream first.

EXPERT_DATA = "expert.npz"  # D: the (optionally noisy) expert data for pretraining
EXPERT_DATA_CLEAN = "expert_clean.npz"  # D*: the clean expert data


def stage_run_dir(config: ExperimentConfig, runs_dir: str | Path, stage: str, overwrite: bool = False) -> RunDir:
    path = RunDir.path_for(runs_dir, config.run.experiment, stage, config.run.seed)
    return RunDir.open(path, stage_config(config, stage), overwrite=overwrite)


def run_collect(config: ExperimentConfig, runs_dir: str | Path, overwrite: bool = False) -> RunDir:
    """Generate D and D* on the pretraining tasks into the collect stage's run directory (for the
    ant, with the ant_expert stage's PPO policy: `collect_experts`)."""
    run = stage_run_dir(config, runs_dir, "collect", overwrite)
    if run.is_complete:
        print(f"collect: complete, skipped ({run.path})")
        return run
    env = config.env.make()
    params = env.pretrain_params()
    noisy_key, clean_key = jax.random.split(stage_key(config, "collect"))
    noisy_expert, clean_expert = collect_experts(config, runs_dir, env)
    cfg = config.collect
    datasets = {
        EXPERT_DATA: expert.collect(env, params, noisy_expert, noisy_key, cfg.num_episodes, cfg.episodes_per_batch),
        EXPERT_DATA_CLEAN: expert.collect(env, params, clean_expert, clean_key, cfg.num_episodes_clean,
                                          cfg.episodes_per_batch),
    }
    summary = {}
    for filename, dataset in datasets.items():
        expert.save_dataset(dataset, run.path / filename)
        summary[filename] = {"episodes": int(dataset.num_episodes), "steps": int(dataset.mask.sum()),
                             "expert_success_rate": float(dataset.success.mean())}
    run.mark_complete(summary)
    print(f"collect: done ({run.path}): {summary}")
    return run


# ----------------------------------------------------------------------------------------------
# The ant's expert: a PPO policy trained on the privileged variant of the env (stage "ant_expert"),
# where the grid's expert is a planner. Everything the ant adds to the stages is in this block.


def expert_sections(config: ExperimentConfig, stage: str) -> tuple[str, ...]:
    """("ppo",) for a stage that reads expert data of an env whose expert is trained (the ant): its
    data depend on the expert's training, so changing `ppo` must make such a stage refuse to resume.
    The grid's stages record no `ppo` section."""
    reads_data = "collect" in STAGE_SECTIONS[stage]
    return ("ppo",) if reads_data and ppo_expert.privileged_variant(config.env.name) else ()


def check_collect_fits_expert(config: ExperimentConfig) -> None:
    """`collect.epsilon` is the grid expert's noise; the ant's D is made noisy by sampling the PPO
    expert's Gaussian instead, so a nonzero epsilon there would be silently ignored: refuse it."""
    if ppo_expert.privileged_variant(config.env.name) is not None:
        check(config.collect.epsilon == 0.0, "collect.epsilon",
              f"must be 0 for {config.env.name} (the grid expert's noise; the ant's D samples the PPO expert)",
              config.collect.epsilon)
        check(config.pretrain.data == "dataset" or config.pretrain.labels == "taken", "pretrain.labels",
              f"must be 'taken' for {config.env.name} with data 'online' (its PPO expert has no noise-free "
              "distribution to label a noisy expert's states with)", config.pretrain.labels)


def expert_env(config: ExperimentConfig) -> envs.Env:
    """The privileged variant of the configured env, which the PPO expert sees (ConfigError without one)."""
    return ppo_expert.make_privileged_env(config.env.name, config.env.horizon)


def run_ant_expert(config: ExperimentConfig, runs_dir: str | Path, overwrite: bool = False) -> RunDir:
    """Train (or resume) the PPO expert on the privileged variant of the env, on the pretraining
    tasks. Refuses an env without a privileged variant (the grid) before any work. The summary adds
    the greedy policy's `success_rate` (spec: the paper's expert reaches 0.8; the ant's RL success
    is reported normalised by it)."""
    env = expert_env(config)
    run = stage_run_dir(config, runs_dir, "ant_expert", overwrite)
    if run.is_complete:
        print(f"ant_expert: complete, skipped ({run.path})")
        return run
    params = env.pretrain_params()
    init_key, eval_key = jax.random.split(stage_key(config, "ant_expert"))
    cfg = config.ppo
    state = ppo.init(init_key, cfg, env, params)
    mesh = build_mesh(config.mesh)
    result = run_training(
        run,
        state,
        ppo.make_train_chunk(cfg, env, params, state.graphdef, mesh),
        cfg.num_chunks,
        steps_per_chunk=cfg.iterations_per_chunk,
        loop=config.loop,
        evaluate=ppo.make_evaluate(cfg, env, params, eval_key),
        description="ant_expert",
        mesh=mesh,
    )
    metrics = result.summary["metrics"]
    # The post-training task, which the expert never trained on (paper: 0.7): the ant's RL success
    # is reported relative to it (the figures' Fig. 8b).
    posttrain = jax.device_get(ppo.make_evaluate(cfg, env, env.posttrain_params(), eval_key)(result.state))
    run.mark_complete({**result.summary, "env": env.name, "env_steps": metrics["env_steps"],
                       "success_rate": metrics["eval/success_rate"], "return": metrics["eval/return"],
                       "posttrain_success_rate": float(posttrain["success_rate"])})
    print(f"ant_expert: done ({run.path}): {env.name} greedy success {metrics['eval/success_rate']:.3f} "
          f"(post-training task {float(posttrain['success_rate']):.3f}), "
          f"return {metrics['eval/return']:.3g} after {metrics['env_steps']:.0f} env steps, "
          f"{result.summary['run_s'] + result.summary['compile_s']:.0f} s")
    return run


def load_ant_expert(config: ExperimentConfig, runs_dir: str | Path) -> ppo.PPOState:
    """The ant_expert stage's final PPO state (training it first if it is not complete)."""
    from hrl.infra.checkpoint import Checkpointer

    run = run_ant_expert(config, runs_dir)
    env = expert_env(config)
    like = jax.eval_shape(lambda: ppo.init(jax.random.key(0), config.ppo, env, env.pretrain_params()))
    with Checkpointer(run.checkpoint_dir) as checkpointer:
        restored = checkpointer.restore_latest(like)
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {run.checkpoint_dir}")
    return restored[1]


def clean_expert(config: ExperimentConfig, runs_dir: str | Path, env: envs.Env) -> expert.Expert:
    """D*'s expert, which the `data: online` stages run inside their updates."""
    if ppo_expert.privileged_variant(config.env.name) is None:
        return make_expert(env, 0.0)
    return collect_experts(config, runs_dir, env)[1]


def collect_experts(config: ExperimentConfig, runs_dir: str | Path, env: envs.Env) -> tuple[expert.Expert, expert.Expert]:
    """(D's expert, D*'s expert). The grid: the shortest-path planner with `collect.epsilon` and
    with 0. An env with a privileged variant (the ant): the ant_expert stage's policy, sampled and
    its mean, acting on the privileged observation while `collect` records `env`'s plain one."""
    if ppo_expert.privileged_variant(config.env.name) is None:
        return make_expert(env, config.collect.epsilon), make_expert(env, 0.0)
    state = load_ant_expert(config, runs_dir)
    privileged, normalized = expert_env(config), config.ppo.normalize_observations
    return (ppo_expert.policy_expert(state, privileged, sample=True, normalize_observations=normalized),
            ppo_expert.policy_expert(state, privileged, sample=False, normalize_observations=normalized))


def run_bc(config: ExperimentConfig, runs_dir: str | Path, overwrite: bool = False) -> RunDir:
    """Behaviour cloning on D, resuming from the latest checkpoint of an interrupted run."""
    run = stage_run_dir(config, runs_dir, "bc", overwrite)
    if run.is_complete:
        print(f"bc: complete, skipped ({run.path})")
        return run
    env = config.env.make()
    if not isinstance(env.action_space, Discrete):
        raise ConfigError(f"env.name: behaviour cloning (stage 'bc') is for discrete actions, {env.name} has continuous ones")
    dataset = expert.load_dataset(run_collect(config, runs_dir).path / EXPERT_DATA)
    init_key, eval_key = jax.random.split(stage_key(config, "bc"))
    cfg = config.bc
    mesh = build_mesh(config.mesh)
    result = run_training(
        run,
        bc.init(init_key, cfg, obs_dim=env.observation_space.shape[0], num_actions=env.action_space.n),
        bc.make_train_chunk(cfg, dataset, mesh),
        cfg.num_chunks,
        steps_per_chunk=cfg.updates_per_chunk,
        loop=config.loop,
        evaluate=bc.make_evaluate(cfg, env, env.fixed_task_params(cfg.eval_task), eval_key),
        description="bc",
        mesh=mesh,
    )
    run.mark_complete(result.summary)
    print(f"bc: done ({run.path}): " + ", ".join(f"{k}={v:.4g}" for k, v in result.summary["metrics"].items()
                                                 if not k.startswith("time/")))
    return run


def init_pretrain_state(config: ExperimentConfig, env: envs.Env, key: jax.Array) -> TrainState:
    """The base model's initial train state, sized for `env` (its heads follow `env`'s spaces)."""
    return pretrain.init(key, config.pretrain, config.model, env.observation_space, env.action_space,
                         getattr(env, "grid_shape", None))


def pretrain_batches(config: ExperimentConfig, runs_dir: str | Path, env: envs.Env):
    """Pretraining's batch sampler: from the collected D, or fresh episodes of D's expert."""
    cfg = config.pretrain
    if cfg.data == "online":
        if cfg.labels == "posterior":
            task_blind = make_task_blind_labelled_expert(env, config.collect.epsilon)
            to_targets = functools.partial(pretrain.posterior_targets, layouts_doable=config.env.solvable_only)
            return pretrain.online_batches(env, env.pretrain_params(), task_blind, cfg.batch_size, to_targets)
        if cfg.labels == "expert":
            labelled = make_labelled_expert(env, config.collect.epsilon)
        else:
            noisy_expert = collect_experts(config, runs_dir, env)[0]
            labelled = pretrain.taken_action_targets(noisy_expert, env.action_space)
        return pretrain.online_batches(env, env.pretrain_params(), labelled, cfg.batch_size,
                                       step_weight=pretrain_step_weight(config))
    dataset = expert.load_dataset(run_collect(config, runs_dir).path / EXPERT_DATA)
    return pretrain.dataset_batches(dataset, cfg.batch_size, env.action_space)


def pretrain_step_weight(config: ExperimentConfig):
    """`pretrain.boundary_weight`'s step weight, or None where every step weighs alike (the config
    refuses other weights outside the grid)."""
    weight = config.pretrain.boundary_weight
    return None if weight == 1 else pretrain.boundary_weight(weight)


def pretrain_own_batches(config: ExperimentConfig, env: envs.Env):
    """The sampler of the model's own labelled episodes (`pretrain.own_episodes`; grid only, as the
    config checks), or None."""
    cfg = config.pretrain
    if cfg.own_episodes == 0:
        return None
    return pretrain.own_episode_batches(env, cfg.own_episodes, config.collect.epsilon, config.env.solvable_only,
                                        pretrain_step_weight(config))


def run_pretrain(config: ExperimentConfig, runs_dir: str | Path, overwrite: bool = False) -> RunDir:
    """Pretrain the base model on D; evaluate it closed-loop in the environment."""
    run = stage_run_dir(config, runs_dir, "pretrain", overwrite)
    if run.is_complete:
        print(f"pretrain: complete, skipped ({run.path})")
        return run
    env = config.env.make()
    init_key, eval_key = jax.random.split(stage_key(config, "pretrain"))
    cfg = config.pretrain
    mesh = build_mesh(config.mesh)
    train_chunk = pretrain.make_train_chunk(cfg, pretrain_batches(config, runs_dir, env), mesh,
                                            own_batch=pretrain_own_batches(config, env))
    result = run_training(
        run,
        init_pretrain_state(config, env, init_key),
        train_chunk,
        cfg.num_chunks,
        steps_per_chunk=cfg.updates_per_chunk,
        loop=config.loop,
        evaluate=pretrain.make_evaluate(cfg, env, eval_key),
        description="pretrain",
        mesh=mesh,
    )
    run.mark_complete(result.summary)
    print(f"pretrain: done ({run.path}): " + ", ".join(f"{k}={v:.4g}" for k, v in result.summary["metrics"].items()
                                                       if not k.startswith("time/")))
    return run


def load_base_model(config: ExperimentConfig, runs_dir: str | Path) -> TrainState:
    """The pretrained base model's final train state (pretraining first if it is not complete)."""
    from hrl.infra.checkpoint import Checkpointer

    run = run_pretrain(config, runs_dir)
    env = config.env.make()
    like = jax.eval_shape(lambda: init_pretrain_state(config, env, jax.random.key(0)))
    with Checkpointer(run.checkpoint_dir) as checkpointer:
        restored = checkpointer.restore_latest(like)
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {run.checkpoint_dir}")
    return restored[1]


def run_probe(config: ExperimentConfig, runs_dir: str | Path, overwrite: bool = False) -> RunDir:
    """Linear probes of the current subgoal on every layer of the frozen base model, on D with the
    last episodes held out. The summary adds `heldout_accuracy_by_layer` and the chance level."""
    run = stage_run_dir(config, runs_dir, "probe", overwrite)
    if run.is_complete:
        print(f"probe: complete, skipped ({run.path})")
        return run
    base = load_base_model(config, runs_dir).module()
    dataset = expert.load_dataset(run_collect(config, runs_dir).path / EXPERT_DATA)
    num_subgoals = config.env.make().num_subgoals
    cfg = config.probe
    train, heldout = probe.split_episodes(dataset, cfg.heldout_fraction)
    mesh = build_mesh(config.mesh)
    result = run_training(
        run,
        probe.init(stage_key(config, "probe"), cfg, base, num_subgoals),
        probe.make_train_chunk(cfg, base, train, mesh),
        cfg.num_chunks,
        steps_per_chunk=cfg.updates_per_chunk,
        loop=config.loop,
        evaluate=probe.make_evaluate(cfg, base, heldout),
        description="probe",
        mesh=mesh,
    )
    metrics = result.summary["metrics"]
    accuracy = {str(layer): metrics[f"eval/heldout_accuracy/layer_{layer}"] for layer in range(base.num_layers + 1)}
    chance = probe.majority_class_accuracy(train, heldout, num_subgoals)
    run.mark_complete({**result.summary, "heldout_accuracy_by_layer": accuracy, "heldout_chance_accuracy": chance})
    print(f"probe: done ({run.path}): held-out accuracy by layer "
          + ", ".join(f"{layer}: {value:.3f}" for layer, value in accuracy.items()) + f" (chance {chance:.3f})")
    return run


TRANSITIONS_FILE = "transitions.json"  # {layer: {"X->Y": success}} of the two-subgoal tasks (controllers)


def run_controllers(config: ExperimentConfig, runs_dir: str | Path, overwrite: bool = False,
                    oracle: bool = False) -> RunDir:
    """Supervised controllers on D*, one set per controlled layer, chained on the post-training task
    and on the pretraining tasks. The summary adds `posttrain_success_by_layer` (and
    `posttrain_greedy_success_by_layer`, the most likely actions'), `pretrain_success_by_layer`,
    the unsteered `base_posttrain_success` (and `base_posttrain_greedy_success`) and, on every two-subgoal
    task X-Y, the mean success over the pairs whose transition X -> Y some pretraining task has
    (`seen_transition_success_by_layer`) and over those none has (`unseen_...`); each pair's is in
    TRANSITIONS_FILE. Composing the post-training task needs the unseen ones.

    With `oracle` (stage controllers_oracle), the same controllers learn from the clean expert on
    the post-training task itself instead of D*. That is not the method (the task's transitions
    are what the method must compose without seeing them): it measures how far chaining linear
    controllers can take this base model at all, so a shortfall of the real controllers splits
    into what the base model cannot be steered to and what the controllers fail to compose."""
    stage = "controllers_oracle" if oracle else "controllers"
    run = stage_run_dir(config, runs_dir, stage, overwrite)
    if run.is_complete:
        print(f"{stage}: complete, skipped ({run.path})")
        return run
    base = load_base_model(config, runs_dir).module()
    env = config.env.make()
    cfg = config.controllers
    layers = cfg.swept_layers(base.num_layers)
    init_key, eval_key = jax.random.split(stage_key(config, "controllers"))  # the oracle: the same draws
    mesh = build_mesh(config.mesh)
    result = run_training(
        run,
        controllers.init(init_key, cfg, base, len(layers), env.num_subgoals),
        controllers.make_train_chunk(cfg, base, layers, controller_episodes(config, runs_dir, env, oracle), mesh,
                                     controller_own_episodes(config, runs_dir, env, base, layers, oracle)),
        cfg.num_chunks,
        steps_per_chunk=cfg.updates_per_chunk,
        loop=config.loop,
        evaluate=controllers.make_evaluate(cfg, base, layers, env, eval_key),
        description=stage,
        mesh=mesh,
    )
    metrics = result.summary["metrics"]
    success = {name: {str(layer): metrics[f"eval/{name}/layer_{layer}"] for layer in layers}
               for name in ("posttrain_success", "posttrain_greedy_success", "pretrain_success")}
    unsteered = controllers.evaluate_base(cfg, base, env, eval_key)
    transitions = controllers.summarise_transitions(
        env, layers, jax.device_get(controllers.make_evaluate_transitions(cfg, base, layers, env, eval_key)(result.state)))
    (run.path / TRANSITIONS_FILE).write_text(json.dumps(transitions["pairs"], indent=2))
    run.mark_complete({**result.summary, "posttrain_success_by_layer": success["posttrain_success"],
                       "posttrain_greedy_success_by_layer": success["posttrain_greedy_success"],
                       "pretrain_success_by_layer": success["pretrain_success"],
                       "base_posttrain_success": unsteered["success_rate"],
                       "base_posttrain_greedy_success": unsteered["greedy_success_rate"],
                       "seen_transition_success_by_layer": transitions["seen"],
                       "unseen_transition_success_by_layer": transitions["unseen"]})
    by_layer = lambda values: ", ".join(f"{layer}: {value:.3f}" for layer, value in values.items())
    print(f"{stage}: done ({run.path}): post-training success by controlled layer {by_layer(success['posttrain_success'])}"
          f" (greedy {by_layer(success['posttrain_greedy_success'])}; unsteered base {unsteered['success_rate']:.3f},"
          f" greedy {unsteered['greedy_success_rate']:.3f}); on the pretraining tasks {by_layer(success['pretrain_success'])};"
          f" two-subgoal tasks X-Y whose transition pretraining has {by_layer(transitions['seen'])}, has not"
          f" {by_layer(transitions['unseen'])}")
    return run


def discovery_base(config: ExperimentConfig, runs_dir: str | Path, variant: str):
    """(the frozen base model or None, what `discovery.init` takes as `base`) for a variant:
    co-trained, a function key -> a fresh base model; otherwise the pretrained base model."""
    if variant != "cotrained":
        base = load_base_model(config, runs_dir).module()
        return base, base
    env = config.env.make()

    def make_base(key):
        return make_model(config.model, env.observation_space, env.action_space,
                          grid_shape=getattr(env, "grid_shape", None), rngs=nnx.Rngs(params=key))

    return None, make_base


def controller_episodes(config: ExperimentConfig, runs_dir: str | Path, env: envs.Env,
                        oracle: bool = False) -> controllers.Sampler:
    """The supervised controllers' batches: from the collected D*, or fresh episodes of its clean
    expert (with the counterfactual labels of `controllers.counterfactual_weight`); for the
    oracle, always fresh episodes of that expert on the post-training task."""
    cfg = config.controllers
    if oracle or cfg.data == "online":
        labeller = make_subgoal_start_labeller(env) if cfg.counterfactual_weight > 0 else None
        return controllers.online_episodes(env, controller_tasks(env, oracle), clean_expert(config, runs_dir, env),
                                           cfg.batch_size, labeller)
    dataset = expert.load_dataset(run_collect(config, runs_dir).path / EXPERT_DATA_CLEAN)
    return controllers.dataset_episodes(dataset, cfg.batch_size)


def controller_own_episodes(config: ExperimentConfig, runs_dir: str | Path, env: envs.Env, base, layers: tuple[int, ...],
                            oracle: bool = False) -> Callable | None:
    """The sampler of the steered model's own episodes (`controllers.own_episodes`; grid only, as
    the config checks) on the tasks the controllers learn, labelled by D*'s expert, or None."""
    cfg = config.controllers
    if cfg.own_episodes == 0:
        return None
    return controllers.own_steered_episodes(env, controller_tasks(env, oracle), clean_expert(config, runs_dir, env),
                                            cfg.own_episodes, base, layers)


def controller_tasks(env: envs.Env, oracle: bool) -> Any:
    """The tasks the supervised controllers learn: D*'s (pretraining), or the post-training task's for the oracle."""
    return env.posttrain_params() if oracle else env.pretrain_params()


DISCOVERY_ANALYSIS = "analysis.npz"  # held-out beta, NLL and KL per alpha and step, for the figures


def run_discovery(config: ExperimentConfig, runs_dir: str | Path, overwrite: bool = False,
                  variant: str = "frozen", seeds: Sequence[int] | None = None) -> list[RunDir]:
    """The metacontroller's alpha sweep on D* (frozen base, beta = 1, or co-trained from scratch),
    for `seeds` (default: `run.seed`) in one vmapped program. The summary adds per alpha the
    held-out rate-distortion point and switching statistics; the run directory keeps the held-out
    arrays in analysis.npz."""
    stage = DISCOVERY_STAGES[variant]
    env = config.env.make()
    cfg = config.discovery
    layer = cfg.controlled_layer(config.model.num_layers)
    if cfg.data == "online" and ppo_expert.privileged_variant(config.env.name) and len(seeds or []) > 1:
        # One sampler serves every seed of the vmapped program, but each seed has its own PPO expert.
        raise ConfigError(f"discovery.data: 'online' trains one seed at a time for {env.name} (each seed has "
                          "its own PPO expert); use 'dataset' or run the seeds one by one")
    online = (discovery.online_episodes(env, env.pretrain_params(), clean_expert(config, runs_dir, env), cfg.batch_size,
                                        make_expert_distribution(env) if cfg.labels == "expert" else None)
              if cfg.data == "online" else None)
    splits = {seed: probe.split_episodes(expert.load_dataset(run_collect(with_seed(config, seed), runs_dir).path
                                                             / EXPERT_DATA_CLEAN), cfg.heldout_fraction)
              for seed in (seeds if seeds is not None else [config.run.seed])}
    # Every seed's episodes cut after the longest of them all: their arrays stack, and the steps
    # after it are padding in every episode (D*'s episodes average about a third of the horizon).
    lengths = [max(int(np.max(split[part].lengths)) for split in splits.values()) for part in (0, 1)]

    def parts(seeded: ExperimentConfig) -> SeedParts:
        frozen_base, make_base = discovery_base(seeded, runs_dir, variant)
        train, heldout = (discovery.crop_episodes(part, length) for part, length in zip(splits[seeded.run.seed], lengths))
        state = discovery.init(stage_key(seeded, stage), cfg, config.metacontroller, variant, make_base)
        return SeedParts(state, (frozen_base, train, heldout), None)

    def make_chunk(frozen, mesh):
        frozen_base, train, _ = frozen
        episodes = online if cfg.data == "online" else discovery.dataset_episodes(train, cfg.batch_size)
        return discovery.make_train_chunk(cfg, config.metacontroller, frozen_base, layer, episodes, mesh)

    def finish(run: RunDir, result: TrainResult, frozen) -> None:
        frozen_base, _, heldout = frozen
        arrays = jax.device_get(discovery.make_analyse(frozen_base, layer, heldout)(result.state))
        np.savez_compressed(run.path / DISCOVERY_ANALYSIS, alphas=np.asarray(cfg.alphas), subgoals=heldout.subgoals,
                            mask=heldout.mask, **arrays)
        metrics = result.summary["metrics"]
        by_alpha = {f"{alpha:g}": {name.split("/")[1]: value for name, value in metrics.items()
                                   if name.startswith("eval/") and name.endswith("/" + discovery.alpha_name(alpha))}
                    for alpha in cfg.alphas}
        run.mark_complete({**result.summary, "controlled_layer": layer, "heldout_by_alpha": by_alpha})
        print(f"{stage}: done ({run.path}): held-out switch F1 (share of beta in (0.1, 0.9)) by alpha "
              + ", ".join(f"{alpha}: {values['f1']:.3f} ({values['intermediate_beta_share']:.3f})"
                          for alpha, values in by_alpha.items()))

    return train_seeds(
        config, runs_dir, stage, seeds, overwrite, parts, make_chunk=make_chunk,
        make_evaluate=lambda frozen, _: discovery.make_evaluate(cfg, frozen[0], layer, frozen[2]),
        num_chunks=cfg.num_chunks, steps_per_chunk=cfg.updates_per_chunk, finish=finish)


def run_crl(config: ExperimentConfig, runs_dir: str | Path, overwrite: bool = False, stage: str = "crl") -> RunDir:
    """Contrastive goal-conditioned RL on `env` (a goal-reaching environment, envs.goals), from
    scratch. `stage` names the run directory (runs/<experiment>/<stage>/seed_<k>/): the depth
    sweep runs one stage per depth; all share the "crl" key, so depths differ only in the networks.
    metrics.jsonl holds `episodes` (training episodes so far) next to `eval/success_rate`: the
    success-vs-episodes curve of the paper's Fig. 8."""
    env = config.env.make()
    crl.check_env_fits(config.crl, env)  # before any work
    run = RunDir.open(RunDir.path_for(runs_dir, config.run.experiment, stage, config.run.seed),
                      stage_config(config, "crl"), overwrite=overwrite)
    if run.is_complete:
        print(f"{stage}: complete, skipped ({run.path})")
        return run
    env_params = env.default_params
    init_key, eval_key = jax.random.split(stage_key(config, "crl"))
    cfg = config.crl
    mesh = build_mesh(config.mesh)
    result = run_training(
        run,
        crl.init(init_key, cfg, env, env_params),
        crl.make_train_chunk(cfg, env, env_params, mesh),
        cfg.num_chunks,
        steps_per_chunk=cfg.updates_per_chunk,
        loop=config.loop,
        evaluate=crl.make_evaluate(cfg, env, env_params, eval_key),
        description=stage,
        mesh=mesh,
    )
    metrics = result.summary["metrics"]
    run.mark_complete({**result.summary, "env": env.name, "episodes": metrics["episodes"],
                       "env_steps": metrics["env_steps"], "success_rate": metrics["eval/success_rate"],
                       "greedy_success_rate": metrics["eval/greedy_success_rate"]})
    print(f"{stage}: done ({run.path}): {env.name} success {metrics['eval/success_rate']:.3f} "
          f"(greedy {metrics['eval/greedy_success_rate']:.3f}) after {metrics['episodes']:.0f} training episodes, "
          f"{result.summary['run_s'] + result.summary['compile_s']:.0f} s")
    return run


def load_metacontroller(config: ExperimentConfig, runs_dir: str | Path, variant: str):
    """(base model, metacontroller) of a complete discovery run, for `internal_rl.alpha` (the
    discovery stage runs first if it is not complete). Co-trained: the base trained with it."""
    from hrl.infra.checkpoint import Checkpointer

    (run,) = run_discovery(config, runs_dir, variant=variant)
    frozen_base, make_base = discovery_base(config, runs_dir, variant)
    stage = DISCOVERY_STAGES[variant]
    like = jax.eval_shape(lambda: discovery.init(stage_key(config, stage), config.discovery, config.metacontroller,
                                                 variant, make_base))
    with Checkpointer(run.checkpoint_dir) as checkpointer:
        restored = checkpointer.restore_latest(like)
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {run.checkpoint_dir}")
    state = restored[1]
    index = config.discovery.alphas.index(config.internal_rl.alpha)
    learner = nnx.merge(state.graphdef, jax.tree.map(lambda x: x[index], state.params))
    return (learner.base if frozen_base is None else frozen_base), learner.metacontroller


def run_internal_rl(config: ExperimentConfig, runs_dir: str | Path, overwrite: bool = False,
                    variant: str = "frozen", seeds: Sequence[int] | None = None) -> list[RunDir]:
    """RL over z on the post-training task with a discovery variant's frozen metacontroller (the
    method, or the beta = 1 and co-trained ablations), for `seeds` (default: `run.seed`) in one
    vmapped program. metrics.jsonl holds `episodes` next to the training batches' `success_rate`:
    the success-vs-episodes curve of the paper's Fig. 8."""
    cfg = config.internal_rl
    stage = INTERNAL_RL_STAGES[variant]
    env = config.env.make()
    layer = config.discovery.controlled_layer(config.model.num_layers)

    def abstract_env(base, metacontroller):
        return internal_rl.AbstractActionEnv(env, env.posttrain_params(), base, metacontroller, layer,
                                             cfg.switch_threshold)

    def parts(seeded: ExperimentConfig) -> SeedParts:
        base, metacontroller = load_metacontroller(seeded, runs_dir, variant)
        init_key, eval_key = jax.random.split(stage_key(seeded, stage))
        return SeedParts(internal_rl.init(init_key, cfg, abstract_env(base, metacontroller)), (base, metacontroller),
                         eval_key)

    return train_seeds(
        config, runs_dir, stage, seeds, overwrite, parts,
        make_chunk=lambda frozen, mesh: internal_rl.make_train_chunk(cfg, abstract_env(*frozen), mesh),
        make_evaluate=lambda frozen, key: internal_rl.make_evaluate(cfg, abstract_env(*frozen), key),
        num_chunks=cfg.num_chunks, steps_per_chunk=cfg.updates_per_chunk,
        finish=lambda run, result, _: finish_rl_stage(run, stage, result))


def run_grpo(config: ExperimentConfig, runs_dir: str | Path, overwrite: bool = False,
             seeds: Sequence[int] | None = None) -> list[RunDir]:
    """Raw-action RL fine-tuning the pretrained base model on the post-training task, for `seeds`
    (default: `run.seed`) in one vmapped program."""
    cfg = config.grpo
    env = config.env.make()

    def parts(seeded: ExperimentConfig) -> SeedParts:
        base = load_base_model(seeded, runs_dir).module()
        init_key, eval_key = jax.random.split(stage_key(seeded, "grpo"))
        return SeedParts(grpo.init(init_key, cfg, base), (base,), eval_key)

    return train_seeds(
        config, runs_dir, "grpo", seeds, overwrite, parts,
        make_chunk=lambda frozen, mesh: grpo.make_train_chunk(cfg, frozen[0], env, env.posttrain_params(), mesh),
        make_evaluate=lambda frozen, key: grpo.make_evaluate(cfg, env, env.posttrain_params(), key),
        num_chunks=cfg.num_chunks, steps_per_chunk=cfg.updates_per_chunk,
        finish=lambda run, result, _: finish_rl_stage(run, "grpo", result))


@dataclasses.dataclass
class SeedParts:
    """What one seed of a stage trains from: its initial train state, what its chunk uses and does
    not train (the pretrained base, a metacontroller, datasets) and its evaluation key."""

    initial_state: TrainState
    frozen: Any  # a pytree (nnx modules are pytrees), the same structure for every seed
    eval_key: jax.Array


def train_seeds(config: ExperimentConfig, runs_dir: str | Path, stage: str, seeds: Sequence[int] | None,
                overwrite: bool, parts: Callable[[ExperimentConfig], SeedParts], *, make_chunk: Callable,
                make_evaluate: Callable, num_chunks: int, steps_per_chunk: int,
                finish: Callable[[RunDir, TrainResult, Any], None]) -> list[RunDir]:
    """Train `stage` for every seed whose run is not complete, each into its own run directory.

    One seed trains as it always has, from `make_chunk(frozen, mesh)` and `make_evaluate(frozen,
    eval_key)` of its parts, and so does each seed in turn over a device mesh. Several seeds
    without a mesh are one vmapped program (`hrl.infra.loop.vmap_seeds`): the seeds' frozen modules
    and keys are stacked along a leading axis, so seed k still acts with its own upstream (its base
    model, its metacontroller) and its numbers match a run of its own up to float rounding. On a
    2-core CPU the small models are overhead-bound, so seeds come almost free.
    """
    seeded = [with_seed(config, seed) for seed in (seeds if seeds is not None else [config.run.seed])]
    runs = [stage_run_dir(seed_config, runs_dir, stage, overwrite) for seed_config in seeded]
    for run in runs:
        if run.is_complete:
            print(f"{stage}: complete, skipped ({run.path})")
    pending = [(seed_config, run) for seed_config, run in zip(seeded, runs) if not run.is_complete]
    if not pending:
        return runs
    mesh = build_mesh(config.mesh)
    seed_parts = [parts(seed_config) for seed_config, _ in pending]
    loop_args = dict(steps_per_chunk=steps_per_chunk, loop=config.loop, description=stage, mesh=mesh)
    if len(pending) == 1 or mesh is not None:
        # Over a mesh, each seed's batch is split over every device, one seed after another.
        results = [run_training(run, part.initial_state, make_chunk(part.frozen, mesh), num_chunks,
                                evaluate=make_evaluate(part.frozen, part.eval_key), **loop_args)
                   for part, (_, run) in zip(seed_parts, pending)]
    else:
        constants = stack_seeds([(part.frozen, part.eval_key) for part in seed_parts])  # nnx modules are pytrees
        results = run_training_seeds(
            [run for _, run in pending], stack_seeds([part.initial_state for part in seed_parts]),
            vmap_seeds(lambda seed: make_chunk(seed[0], None), constants), num_chunks,
            evaluate=vmap_seeds(lambda seed: make_evaluate(*seed), constants), **loop_args)
    for (_, run), result, part in zip(pending, results, seed_parts):
        finish(run, result, part.frozen)
    return runs


def with_seed(config: ExperimentConfig, seed: int) -> ExperimentConfig:
    return dataclasses.replace(config, run=dataclasses.replace(config.run, seed=seed))


def run_stage(stage: Callable, config: ExperimentConfig, runs_dir: str | Path, seeds: Sequence[int]) -> None:
    """A pipeline stage for every seed: one vmapped program where the stage takes `seeds`."""
    if "seeds" in inspect.signature(stage).parameters:
        stage(config, runs_dir, seeds=seeds)
    else:
        for seed in seeds:
            stage(with_seed(config, seed), runs_dir)


def finish_rl_stage(run: RunDir, stage: str, result) -> None:
    metrics = result.summary["metrics"]
    seconds = result.summary["run_s"] + result.summary["compile_s"]
    run.mark_complete({**result.summary, "episodes": metrics["episodes"], "success_rate": metrics["success_rate"],
                       "eval_success_rate": metrics["eval/success_rate"]})
    print(f"{stage}: done ({run.path}): post-training success {metrics['success_rate']:.3f} in the last training "
          f"batches, {metrics['eval/success_rate']:.3f} evaluated, after {metrics['episodes']:.0f} episodes, {seconds:.0f} s")


# The stages `hrl pipeline` runs, in order.
PIPELINE_STAGES = (run_collect, run_bc, run_pretrain, run_probe, run_controllers,
                   *(functools.partial(run_discovery, variant=variant) for variant in DISCOVERY_STAGES),
                   *(functools.partial(run_internal_rl, variant=variant) for variant in INTERNAL_RL_STAGES),
                   run_grpo)


def pipeline_stages(config: ExperimentConfig) -> tuple[Callable, ...]:
    """PIPELINE_STAGES for the configured env: without BC (a discrete-action baseline) for
    continuous actions (the ant)."""
    discrete = isinstance(config.env.make().action_space, Discrete)
    return tuple(stage for stage in PIPELINE_STAGES if discrete or stage is not run_bc)


def write_results_table(config: ExperimentConfig, runs_dir: str | Path, seeds: list[int]) -> Path:
    """runs/<experiment>/results.md: each stage's final numbers per seed, from the run directories."""
    root = Path(runs_dir) / config.run.experiment
    lines = [f"# Results of {config.run.experiment}", ""]
    for stage in STAGE_SECTIONS:
        summaries = {seed: RunDir(RunDir.path_for(runs_dir, config.run.experiment, stage, seed)).summary() for seed in seeds}
        rows = {seed: _flatten(summary) for seed, summary in summaries.items() if summary is not None}
        if not rows:
            continue
        columns = sorted({name for row in rows.values() for name in row if "time" not in name.split("/")})
        lines += [f"## {stage}", "", "| seed | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        lines += [f"| {seed} | " + " | ".join(_format(row.get(name)) for name in columns) + " |" for seed, row in rows.items()]
        lines.append("")
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.md").write_text("\n".join(lines))
    return root / "results.md"


def _flatten(summary: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for name, value in summary.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}/"))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _format(value: Any) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
