"""Train the ant-pinpad PPO expert: one flat policy for all 16 pretraining tasks, on the privileged
observation and dense reward of `envs.make("AntPinpadExpert-v0")` (hrl/algos/ppo.py).

    python experiments/train_ant_expert.py --iterations 20 --chunk 10 --num-envs 64     # CPU smoke run
    python experiments/train_ant_expert.py --iterations 4000 --num-envs 2048            # GPU

Writes runs/<experiment>/ant_expert/seed_<k>/ (config.yaml, TensorBoard events, metrics.jsonl,
orbax checkpoints, `complete`); an interrupted run resumes from its last checkpoint. Evaluation:
`eval/success_rate` of the greedy (Gaussian-mean) policy on fixed layouts of the pretraining
tasks (the paper's expert reaches 0.8).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import envs
from hrl.algos import ppo
from hrl.infra.loop import LoopConfig
from hrl.infra.rundir import RunDir


def parse_args(argv=None) -> argparse.Namespace:
    defaults = ppo.PPOConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--experiment", default="ant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=defaults.num_iterations)
    parser.add_argument("--chunk", type=int, default=defaults.iterations_per_chunk, help="iterations per jitted chunk")
    parser.add_argument("--num-envs", type=int, default=defaults.num_envs)
    parser.add_argument("--unroll-length", type=int, default=defaults.unroll_length)
    parser.add_argument("--eval-episodes", type=int, default=defaults.eval_episodes)
    parser.add_argument("--eval-every", type=int, default=10, help="chunks")
    parser.add_argument("--overwrite", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = dataclasses.replace(ppo.PPOConfig(), num_iterations=args.iterations, iterations_per_chunk=args.chunk,
                              num_envs=args.num_envs, unroll_length=args.unroll_length,
                              eval_episodes=args.eval_episodes)
    env = envs.make("AntPinpadExpert-v0")
    path = RunDir.path_for(Path(args.runs_dir), args.experiment, "ant_expert", args.seed)
    loop = LoopConfig(checkpoint_every=args.eval_every, eval_every=args.eval_every)
    result = ppo.train(path, cfg, env, env.pretrain_params(), args.seed, loop=loop, overwrite=args.overwrite)
    print(f"{path}: {result.summary['metrics']}")


if __name__ == "__main__":
    main()
