"""The `hrl` command: one subcommand per pipeline stage, configured by a preset and overrides.

    hrl collect  [--preset gridworld/quick] [--runs-dir runs] [--seed K] [--overwrite] [key.sub=value ...]
    hrl train-bc [--preset gridworld/quick] [--runs-dir runs] [--seed K] [--overwrite] [key.sub=value ...]
    hrl render   [--preset ...] [--episode N] [--clean] [--output PATH] [--fps F] [key.sub=value ...]
    hrl headroom [--sequences N] [--episodes N]   (same options as collect; the grid base model against the Bayes floor)
    hrl probe | hrl controllers [--oracle]   (same options as collect)
    hrl discover [--variant frozen|beta1|cotrained] [--seeds 0,1,2]   (same options as collect)
    hrl internal-rl [--variant frozen|beta1|cotrained] [--seeds 0,1,2]   (same options as collect)
    hrl grpo     [--seeds 0,1,2]   (same options as collect; --seeds: one vmapped program, a run dir each)
    hrl crl      [--preset gridworld/crl_quick] ...   (same options as collect)
    hrl train-expert [--preset ant/quick] ...   (same options as collect; the ant's PPO expert, which
                 `hrl collect --preset ant/...` trains first when it is not complete)

User errors (bad config, a run directory made with another config) print one line and exit
with code 2; a training run stopped by a non-finite metric prints one line and exits with 1.
Rerunning an interrupted command resumes it; completed stages are skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from hrl.algos.discovery import VARIANTS as DISCOVERY_VARIANTS
from hrl.data.expert import load_dataset
from hrl.experiment import (
    EXPERT_DATA,
    EXPERT_DATA_CLEAN,
    ExperimentConfig,
    load_base_model,
    run_ant_expert,
    run_bc,
    run_collect,
    run_controllers,
    run_crl,
    run_discovery,
    run_grpo,
    run_internal_rl,
    run_pretrain,
    run_probe,
    pipeline_stages,
    run_stage,
    stage_key,
    write_results_table,
)
from hrl.infra.config import ConfigError, load_config, to_yaml
from hrl.infra.loop import NonFiniteMetricError
from hrl.infra.mesh import initialize_distributed


def collect_command(config: ExperimentConfig, args: argparse.Namespace) -> None:
    run_collect(config, args.runs_dir, overwrite=args.overwrite)


def train_bc_command(config: ExperimentConfig, args: argparse.Namespace) -> None:
    run_bc(config, args.runs_dir, overwrite=args.overwrite)


def pipeline_command(config: ExperimentConfig, args: argparse.Namespace) -> None:
    """Every stage in order, each for every seed (the RL stages train their seeds in one vmapped
    program); complete stages are skipped, interrupted ones resume. Then the results table and
    the figures of the complete stages."""
    from hrl.analysis.figures import write_figures  # matplotlib: only this command needs it

    for stage in pipeline_stages(config):
        run_stage(stage, config, args.runs_dir, args.seeds)
    table = write_results_table(config, args.runs_dir, args.seeds)
    figures = write_figures(args.runs_dir, config.run.experiment, args.seeds)
    print(f"pipeline: done; results in {table}" + "".join(f", {figure}" for figure in figures))


def pretrain_command(config: ExperimentConfig, args: argparse.Namespace) -> None:
    run_pretrain(config, args.runs_dir, overwrite=args.overwrite)


def probe_command(config: ExperimentConfig, args: argparse.Namespace) -> None:
    run_probe(config, args.runs_dir, overwrite=args.overwrite)


def controllers_command(config: ExperimentConfig, args: argparse.Namespace) -> None:
    run_controllers(config, args.runs_dir, overwrite=args.overwrite, oracle=args.oracle)


def discover_command(config: ExperimentConfig, args: argparse.Namespace) -> None:
    run_discovery(config, args.runs_dir, overwrite=args.overwrite, variant=args.variant, seeds=args.seeds)


def internal_rl_command(config: ExperimentConfig, args: argparse.Namespace) -> None:
    run_internal_rl(config, args.runs_dir, overwrite=args.overwrite, variant=args.variant, seeds=args.seeds)


def grpo_command(config: ExperimentConfig, args: argparse.Namespace) -> None:
    run_grpo(config, args.runs_dir, overwrite=args.overwrite, seeds=args.seeds)


def crl_command(config: ExperimentConfig, args: argparse.Namespace) -> None:
    run_crl(config, args.runs_dir, overwrite=args.overwrite)


def train_expert_command(config: ExperimentConfig, args: argparse.Namespace) -> None:
    run_ant_expert(config, args.runs_dir, overwrite=args.overwrite)


def render_command(config: ExperimentConfig, args: argparse.Namespace) -> None:
    """A GIF of one episode of the collected expert data (collecting it first if needed)."""
    from envs.render import dataset_episode_frames, save_gif  # drawing code only this command needs

    run = run_collect(config, args.runs_dir)
    filename = EXPERT_DATA_CLEAN if args.clean else EXPERT_DATA
    dataset = load_dataset(run.path / filename)
    if not 0 <= args.episode < dataset.num_episodes:
        raise ConfigError(f"--episode: must be in 0..{dataset.num_episodes - 1} ({filename}), got {args.episode}")
    output = Path(args.output or run.path / f"{Path(filename).stem}_episode_{args.episode}.gif")
    frames = dataset_episode_frames(dataset, args.episode)
    save_gif(output, frames, fps=args.fps)
    print(f"render: wrote {output} ({len(frames)} frames)")


def headroom_command(config: ExperimentConfig, args: argparse.Namespace) -> None:
    """The base model's cross-entropy to its pretraining labels against the Bayes-optimal
    task-blind predictor's, on fresh episodes of D's expert (`hrl.analysis.headroom`)."""
    import json

    from hrl.analysis import headroom  # the grid expert's per-task knowledge, only this command needs it

    env = config.env.make()
    if env.name != "GridPinpad-v0" or config.pretrain.labels not in ("expert", "posterior"):
        raise ConfigError("headroom: needs gridworld-pinpad and pretrain.labels expert or posterior (it measures against the former)")
    for name in ("sequences", "episodes"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name}: must be >= 1, got {getattr(args, name)}")
    model = load_base_model(config, args.runs_dir).module()
    epsilon = config.collect.epsilon
    summary = headroom.summarise(headroom.step_cross_entropies(model, env, epsilon, stage_key(config, "headroom"), args.sequences))
    closed_loop_key = stage_key(config, "headroom_closed_loop")
    success = headroom.closed_loop_success(model, env, epsilon, closed_loop_key, args.episodes)
    failures = headroom.closed_loop_failures(model, env, closed_loop_key, args.episodes)
    output = run_pretrain(config, args.runs_dir).path / "headroom.json"
    output.write_text(json.dumps({"sequences": args.sequences, **summary, "closed_loop/episodes": args.episodes,
                                  **{f"closed_loop/{name}_success": value for name, value in success.items()},
                                  "closed_loop/model_failures": failures}, indent=2) + "\n")
    for part, meaning in (("all", "every step"), ("open", "next subgoal open"), ("set", "next colour set")):
        print(f"headroom: {meaning}: model {summary[part + '/model']:.4f} vs Bayes floor {summary[part + '/bayes']:.4f} "
              f"nats/step ({summary[part + '/steps']} steps)")
    print(f"headroom: any pretraining task, closed loop: model {success['model']:.3f} vs Bayes task-blind policy "
          f"{success['bayes']:.3f} success ({args.episodes} episodes)")
    print("headroom: the model's failures: " + ", ".join(f"{kind} {count}" for kind, count in
                                                          sorted(failures.items(), key=lambda item: -item[1])))
    print(f"headroom: wrote {output}")


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got {text!r}") from None
    if any(seed < 0 for seed in seeds):
        raise argparse.ArgumentTypeError(f"seeds must be >= 0, got {text!r}")
    return seeds


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--preset", help="configs/<env>/<name>.yaml by name, or a path to a .yaml file "
                                         "(default: gridworld/quick; crl: gridworld/crl_quick; "
                                         "train-expert: ant/quick; pipeline: <family>/quick)")
    common.add_argument("--runs-dir", default="runs", help="root of the run directories (default: %(default)s)")
    common.add_argument("--seed", type=int, help="shorthand for the override run.seed=K")
    common.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
    stage = argparse.ArgumentParser(add_help=False)
    stage.add_argument("--overwrite", action="store_true", help="delete this stage's run directory and start it afresh")

    parser = argparse.ArgumentParser(prog="hrl", description="Internal RL experiments: run pipeline stages from config presets.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    def add(name, handler, description, parents, positional=None):
        command = commands.add_parser(name, parents=parents, help=description, description=description)
        command.set_defaults(handler=handler)
        if positional is not None:
            command.add_argument(positional[0], **positional[1])
        command.add_argument("overrides", nargs="*", metavar="key.sub=value",
                             help="config overrides, e.g. bc.learning_rate=3e-4")
        return command

    family = ("family", dict(choices=["gridworld", "ant"],
                             help="environment family; the preset defaults to <family>/quick"))
    pipeline = add("pipeline", pipeline_command,
                   "run every stage of an experiment in order for several seeds, then write a results table",
                   [common], positional=family)
    pipeline.add_argument("--seeds", type=seed_list, default=[0, 1, 2],
                          help="comma-separated seeds (default: 0,1,2)")
    add("collect", collect_command, "generate the expert datasets D and D* (stage 'collect')", [common, stage])
    add("train-bc", train_bc_command,
        "behaviour-clone the expert with an MLP (stage 'bc'; runs 'collect' first if it is not complete)", [common, stage])
    add("pretrain", pretrain_command,
        "pretrain the base model (transformer or Hawk) on D and evaluate it closed-loop (stage 'pretrain')", [common, stage])
    add("probe", probe_command,
        "linear probes of the current subgoal on every layer of the frozen base model (stage 'probe')",
        [common, stage])
    controllers_parser = add("controllers", controllers_command,
                             "supervised controllers per subgoal and controlled layer, chained on the post-training "
                             "task (stage 'controllers')", [common, stage])
    controllers_parser.add_argument("--oracle", action="store_true",
                                    help="train them on the post-training task itself instead of D* (stage "
                                         "'controllers_oracle'; not the method: the ceiling of chaining on this base model)")
    discover = add("discover", discover_command,
                   "train the metacontroller on D* for every alpha of discovery.alphas side by side "
                   "(stage 'discovery', or 'discovery_beta1' / 'discovery_cotrained' for the ablations)",
                   [common, stage])
    discover.add_argument("--variant", choices=DISCOVERY_VARIANTS, default="frozen",
                          help="frozen base model (the method), beta fixed to 1, or base and metacontroller "
                               "co-trained from scratch (default: %(default)s)")
    internal = add("internal-rl", internal_rl_command,
                   "RL over the metacontroller's abstract actions on the post-training task (stage 'internal_rl', "
                   "or 'internal_rl_beta1' / 'internal_rl_cotrained' on those discovery variants' metacontrollers; "
                   "runs discovery first if it is not complete)", [common, stage])
    internal.add_argument("--variant", choices=DISCOVERY_VARIANTS, default="frozen",
                          help="which discovery run's metacontroller to use (default: %(default)s)")
    grpo_parser = add("grpo", grpo_command,
                      "raw-action RL fine-tuning the pretrained base model on the post-training task (stage 'grpo')",
                      [common, stage])
    for seeded in (discover, internal, grpo_parser):
        seeded.add_argument("--seeds", type=seed_list, help="comma-separated seeds trained together in one vmapped "
                                                        "program, each into its own run directory (default: --seed)")
    crl = add("crl", crl_command,
              "contrastive goal-conditioned RL from scratch on a goal-reaching environment (stage 'crl'; "
              "default preset gridworld/crl_quick: the post-training task; gridworld/crl_goal_quick: reach a cell)",
              [common, stage])
    crl.set_defaults(default_preset="gridworld/crl_quick")
    expert = add("train-expert", train_expert_command,
                 "train the ant's PPO expert on the privileged variant of the env (stage 'ant_expert'; default "
                 "preset ant/quick; `hrl collect --preset ant/...` runs it first when it is not complete). "
                 "Refused for the grid, whose expert is the shortest-path planner", [common, stage])
    expert.set_defaults(default_preset="ant/quick")
    headroom_parser = add("headroom", headroom_command,
                          "the grid base model's pretraining loss against the Bayes-optimal task-blind predictor's, "
                          "on fresh episodes of D's expert (writes headroom.json in the pretrain run directory)",
                          [common])
    headroom_parser.add_argument("--sequences", type=int, default=256,
                                 help="sequences of horizon steps of expert episodes back to back (default: %(default)s)")
    headroom_parser.add_argument("--episodes", type=int, default=256,
                                 help="closed-loop 'any pretraining task' episodes of the model and of the Bayes "
                                      "task-blind policy, on the same layouts (default: %(default)s)")
    render = add("render", render_command, "draw one episode of the collected expert data as a GIF", [common])
    render.add_argument("--episode", type=int, default=0, help="episode index in the dataset (default: %(default)s)")
    render.add_argument("--clean", action="store_true", help="from D* (epsilon 0) instead of D")
    render.add_argument("--output", help="GIF path (default: next to the dataset in the collect run directory)")
    render.add_argument("--fps", type=float, default=4.0, help="frames per second (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    initialize_distributed()  # several hosts: connects them (from JAX_COORDINATOR_ADDRESS etc.); else nothing
    parser = build_parser()
    # Overrides may follow options (`hrl pipeline gridworld --seeds 0,1 bc.batch_size=64`), which
    # argparse leaves over once the positionals are filled: collect them here.
    args, leftover = parser.parse_known_args(argv)
    unknown = [arg for arg in leftover if "=" not in arg or arg.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *leftover]
    try:
        seed = [f"run.seed={args.seed}"] if args.seed is not None else []
        preset = args.preset or getattr(args, "default_preset", None) or f"{getattr(args, 'family', 'gridworld')}/quick"
        config = load_config(ExperimentConfig, preset, [*args.overrides, *seed])
        if args.show_config:
            print(to_yaml(config), end="")
            return 0
        args.handler(config, args)
    except ConfigError as error:
        print(f"hrl {args.command}: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteMetricError as error:
        print(f"hrl {args.command}: training stopped: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"hrl {args.command}: interrupted; the same command resumes from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
