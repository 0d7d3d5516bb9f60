"""The `hrl` command: one subcommand per pipeline stage, configured by a preset and overrides.

    hrl collect  [--preset gridworld/quick] [--runs-dir runs] [--seed K] [key.sub=value ...]
    hrl train-bc [--preset gridworld/quick] [--runs-dir runs] [--seed K] [key.sub=value ...]

User errors (bad config, a run directory made with another config) print one line and exit
with code 2; a training run stopped by a non-finite metric prints one line and exits with 1.
Rerunning an interrupted command resumes it; completed stages are skipped.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from hrl.experiment import ExperimentConfig, run_bc, run_collect
from hrl.infra.config import ConfigError, load_config, to_yaml
from hrl.infra.loop import NonFiniteMetricError

STAGES: dict[str, tuple[Callable, str]] = {
    "collect": (run_collect, "generate the expert datasets D and D* (stage 'collect')"),
    "train-bc": (run_bc, "behaviour-clone the expert with an MLP (stage 'bc'; collects first if needed)"),
}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--preset", default="gridworld/quick",
                        help="configs/<env>/<name>.yaml by name, or a path to a .yaml file (default: %(default)s)")
    common.add_argument("--runs-dir", default="runs", help="root of the run directories (default: %(default)s)")
    common.add_argument("--seed", type=int, help="shorthand for the override run.seed=K")
    common.add_argument("--overwrite", action="store_true",
                        help="delete this stage's run directory and start it afresh")
    common.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
    common.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. bc.learning_rate=3e-4")

    parser = argparse.ArgumentParser(prog="hrl", description="Internal RL experiments: run pipeline stages from config presets.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (_, description) in STAGES.items():
        commands.add_parser(name, parents=[common], help=description, description=description)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        seed = [f"run.seed={args.seed}"] if args.seed is not None else []
        config = load_config(ExperimentConfig, args.preset, [*args.overrides, *seed])
        if args.show_config:
            print(to_yaml(config), end="")
            return 0
        run_stage, _ = STAGES[args.command]
        run_stage(config, args.runs_dir, overwrite=args.overwrite)
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
