"""Experiment and figure: CRL success against network depth (Wang et al. 2025's depth scaling).

    python experiments/crl_depth_scaling.py --preset gridworld/crl_depth_quick --seeds 0            # CPU miniature
    python experiments/crl_depth_scaling.py --preset gridworld/crl_goal_paper --seeds 0,1,2         # GPU

For each depth of `--depths` (default 4,8,16,32,64; the actor and both encoders all at that depth)
and each seed, runs the stage `crl_depth_<d>` into runs/<experiment>/crl_depth_<d>/seed_<k>/
(complete runs are skipped, interrupted ones resume), then reads the run directories and writes
runs/<experiment>/figures/crl_depth_scaling.png (left: final success vs depth, one thin line per
seed and their mean; right: evaluated success vs training episodes, one line per depth, from
metrics.jsonl) and crl_depth_scaling.md (the numbers and the wall-clock per depth).
`--figure-only` skips training. Extra `key.sub=value` arguments override the preset.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from hrl.analysis.figures import save
from hrl.experiment import ExperimentConfig, run_crl
from hrl.infra.config import load_config
from hrl.infra.metrics import read_metrics
from hrl.infra.rundir import RunDir

NETWORKS = ("sa_encoder", "goal_encoder", "actor")


def stage_name(depth: int) -> str:
    return f"crl_depth_{depth}"


def config_at_depth(preset: str, overrides: list[str], depth: int, seed: int) -> ExperimentConfig:
    depths = [f"crl.{net}.depth={depth}" for net in NETWORKS]
    return load_config(ExperimentConfig, preset, [*overrides, *depths, f"run.seed={seed}"])


def success_vs_episodes(run_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(training episodes, evaluated success rate) at every evaluation of a CRL run: the curve of
    the paper's Fig. 8."""
    evaluations = [r for r in read_metrics(run_path) if "eval/success_rate" in r]
    return (np.array([r["episodes"] for r in evaluations]), np.array([r["eval/success_rate"] for r in evaluations]))


def collect_results(runs_dir: Path, experiment: str, depths: list[int], seeds: list[int]) -> dict[int, dict[int, dict]]:
    """{depth: {seed: summary}} of the complete runs."""
    results = {}
    for depth in depths:
        for seed in seeds:
            summary = RunDir(RunDir.path_for(runs_dir, experiment, stage_name(depth), seed)).summary()
            if summary is not None:
                results.setdefault(depth, {})[seed] = summary
    if not results:
        raise FileNotFoundError(f"no complete crl_depth_* run of {experiment} in {runs_dir}")
    return results


def depth_figure(runs_dir: Path, experiment: str, results: dict[int, dict[int, dict]]) -> Path:
    fig = Figure(figsize=(10, 3.8))
    by_depth, over_episodes = fig.subplots(1, 2)
    depths = sorted(results)
    seeds = sorted({seed for runs in results.values() for seed in runs})
    for seed in seeds:
        present = [d for d in depths if seed in results[d]]
        by_depth.plot(present, [results[d][seed]["success_rate"] for d in present], color="tab:blue", alpha=0.35,
                      linewidth=1)
    mean = [np.mean([s["success_rate"] for s in results[d].values()]) for d in depths]
    greedy = [np.mean([s["greedy_success_rate"] for s in results[d].values()]) for d in depths]
    by_depth.plot(depths, mean, color="tab:blue", linewidth=2.5, marker="o", label="sampled actions (mean over seeds)")
    by_depth.plot(depths, greedy, color="tab:orange", linewidth=1.5, marker="s", linestyle="--", label="greedy actions")
    by_depth.set_xscale("log", base=2)
    by_depth.set_xticks(depths, [str(d) for d in depths])
    by_depth.set_xlabel("depth (Dense layers in residual blocks, each network)")
    by_depth.set_ylabel("success rate at the end of training")
    by_depth.set_ylim(-0.02, 1.02)
    by_depth.legend(fontsize=8)
    colours = {depth: f"C{i}" for i, depth in enumerate(depths)}
    for depth in depths:
        for seed in results[depth]:
            episodes, success = success_vs_episodes(RunDir.path_for(runs_dir, experiment, stage_name(depth), seed))
            over_episodes.plot(episodes, success, color=colours[depth], alpha=0.8, linewidth=1,
                               label=f"depth {depth}" if seed == min(results[depth]) else None)
    over_episodes.set_xlabel("training episodes")
    over_episodes.set_ylabel("success rate (sampled actions)")
    over_episodes.set_ylim(-0.02, 1.02)
    over_episodes.legend(fontsize=8)
    fig.suptitle(f"CRL depth scaling: {experiment}")
    return save(fig, runs_dir, experiment, "crl_depth_scaling")


def depth_table(runs_dir: Path, experiment: str, results: dict[int, dict[int, dict]]) -> Path:
    lines = [f"# CRL depth scaling: {experiment}", "",
             "| depth | seed | success (sampled) | success (greedy) | training episodes | updates | compile s | run s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for depth in sorted(results):
        for seed, s in sorted(results[depth].items()):
            lines.append(f"| {depth} | {seed} | {s['success_rate']:.3f} | {s['greedy_success_rate']:.3f} | "
                         f"{s['episodes']:.0f} | {s['step']} | {s['compile_s']:.1f} | {s['run_s']:.1f} |")
    path = Path(runs_dir) / experiment / "figures" / "crl_depth_scaling.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gridworld/crl_depth_quick")
    parser.add_argument("--runs-dir", default="runs", type=Path)
    parser.add_argument("--depths", default="4,8,16,32,64")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--figure-only", action="store_true", help="draw from existing run directories only")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    experiment = config_at_depth(args.preset, args.overrides, depths[0], seeds[0]).run.experiment
    if not args.figure_only:
        for depth in depths:
            for seed in seeds:
                run_crl(config_at_depth(args.preset, args.overrides, depth, seed), args.runs_dir, stage=stage_name(depth))
    results = collect_results(args.runs_dir, experiment, depths, seeds)
    print(f"crl_depth_scaling: wrote {depth_figure(args.runs_dir, experiment, results)} and "
          f"{depth_table(args.runs_dir, experiment, results)}")


if __name__ == "__main__":
    main()
