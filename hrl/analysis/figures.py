"""The paper's figures, drawn from the summaries in the run directories (never from live state).

Each function reads `runs/<experiment>/<stage>/seed_<k>/complete` for the given seeds (seeds
whose stage is unfinished are left out, with a note), draws one line per seed and their mean,
and writes `runs/<experiment>/figures/<name>.png`. `experiments/` holds one script per figure;
`hrl pipeline` calls `write_figures` after its stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from matplotlib.figure import Figure

from hrl.infra.metrics import read_metrics
from hrl.infra.rundir import RunDir


def completed_summaries(runs_dir: str | Path, experiment: str, stage: str, seeds: list[int]) -> dict[int, dict[str, Any]]:
    """{seed: summary} of the seeds whose `stage` is complete; FileNotFoundError if none is."""
    summaries = {seed: RunDir(RunDir.path_for(runs_dir, experiment, stage, seed)).summary() for seed in seeds}
    missing = [seed for seed, summary in summaries.items() if summary is None]
    if len(missing) == len(seeds):
        raise FileNotFoundError(f"no complete '{stage}' run of {experiment} in {runs_dir} for seeds {seeds}")
    if missing:
        print(f"figures: '{stage}' is not complete for seeds {missing}; they are left out")
    return {seed: summary for seed, summary in summaries.items() if summary is not None}


def by_layer(values: dict[str, float]) -> dict[int, float]:
    """A summary's {"<layer>": value} mapping with integer layers."""
    return {int(layer): value for layer, value in values.items()}


def plot_seeds_and_mean(ax, curves: dict[int, dict[int, float]], colour: str = "tab:blue", what: str = "") -> None:
    """One thin line per seed and a bold mean over the seeds (at the layers they all have); only
    the mean has a legend entry, so that several kinds of curves keep the legend short. `what`
    names the kind when an axis has several."""
    prefix = f"{what}: " if what else ""
    for curve in curves.values():
        layers = sorted(curve)
        ax.plot(layers, [curve[layer] for layer in layers], color=colour, alpha=0.35, linewidth=1)
    shared = sorted(set.intersection(*(set(curve) for curve in curves.values())))
    mean = [np.mean([curve[layer] for curve in curves.values()]) for layer in shared]
    seeds = ", ".join(str(seed) for seed in curves)
    ax.plot(shared, mean, color=colour, linewidth=2.5, marker="o",
            label=f"{prefix}mean of seed{'s' if len(curves) > 1 else ''} {seeds}" + (" (thin: each)" if len(curves) > 1 else ""))
    ax.set_xticks(shared)


def save(fig: Figure, runs_dir: str | Path, experiment: str, name: str) -> Path:
    path = Path(runs_dir) / experiment / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


def probe_accuracy_figure(runs_dir: str | Path, experiment: str, seeds: list[int]) -> Path:
    """Held-out accuracy of the linear subgoal probes by layer (paper Fig. 3 / A1)."""
    summaries = completed_summaries(runs_dir, experiment, "probe", seeds)
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    plot_seeds_and_mean(ax, {seed: by_layer(s["heldout_accuracy_by_layer"]) for seed, s in summaries.items()})
    chance = np.mean([s["heldout_chance_accuracy"] for s in summaries.values()])
    ax.axhline(chance, color="gray", linestyle="--", label="chance (commonest subgoal)")
    ax.set(xlabel="layer l (0: embedding)", ylabel="held-out subgoal accuracy", ylim=(0, 1),
           title=f"Linear probes of the current subgoal ({experiment})")
    ax.legend(fontsize=7)
    return save(fig, runs_dir, experiment, "probe_accuracy")


def controller_layer_sweep_figure(runs_dir: str | Path, experiment: str, seeds: list[int]) -> Path:
    """Post-training success of the chained supervised controllers by controlled layer, with the
    unsteered base model as the reference (paper Fig. 4), their success on the pretraining tasks
    (in distribution) and on the two-subgoal tasks with and without a transition that pretraining
    has beside it and, where `hrl controllers --oracle` ran, the post-training success of
    controllers trained on that task itself (the ceiling of chaining)."""
    summaries = completed_summaries(runs_dir, experiment, "controllers", seeds)
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    plot_seeds_and_mean(ax, {seed: by_layer(s["posttrain_success_by_layer"]) for seed, s in summaries.items()},
                        what="post-training task")
    optional = {"pretrain_success_by_layer": ("tab:green", "pretraining tasks"),  # runs older than them have none
                "seen_transition_success_by_layer": ("tab:olive", "two subgoals X-Y, X -> Y in pretraining"),
                "unseen_transition_success_by_layer": ("tab:orange", "two subgoals X-Y, X -> Y never in pretraining")}
    for key, (colour, what) in optional.items():
        if all(key in s for s in summaries.values()):
            plot_seeds_and_mean(ax, {seed: by_layer(s[key]) for seed, s in summaries.items()}, colour=colour, what=what)
    try:  # an optional stage (`hrl controllers --oracle`)
        oracle = completed_summaries(runs_dir, experiment, "controllers_oracle", seeds)
    except FileNotFoundError:
        oracle = {}
    if oracle:
        plot_seeds_and_mean(ax, {seed: by_layer(s["posttrain_success_by_layer"]) for seed, s in oracle.items()},
                            colour="tab:purple", what="oracle (trained on the post-training task)")
    base = np.mean([s["base_posttrain_success"] for s in summaries.values()])
    ax.axhline(base, color="tab:red", linestyle="--", label="unsteered base model, post-training (mean)")
    ax.set(xlabel="controlled layer l (0: embedding)", ylabel="success rate", ylim=(-0.02, 1.02),
           title=f"Chained supervised controllers ({experiment})")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18))  # below: the curves span the axis
    return save(fig, runs_dir, experiment, "controller_layer_sweep")


DISCOVERY_VARIANTS = {"discovery": ("frozen base", "tab:blue"), "discovery_cotrained": ("co-trained", "tab:orange"),
                      "discovery_beta1": ("beta = 1", "tab:gray")}


def rate_distortion_figure(runs_dir: str | Path, experiment: str, seeds: list[int]) -> Path:
    """Held-out KL (rate) against action NLL (distortion) over the alpha sweep, per discovery
    variant: thin lines per seed, the mean bold with its alphas written beside it (paper Fig. 7)."""
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    drawn = 0
    for stage, (label, colour) in DISCOVERY_VARIANTS.items():
        try:
            summaries = completed_summaries(runs_dir, experiment, stage, seeds)
        except FileNotFoundError:
            continue
        curves = [{alpha: (v["heldout_action_nll"], v["heldout_kl"]) for alpha, v in s["heldout_by_alpha"].items()}
                  for s in summaries.values()]
        for curve in curves:
            ax.plot(*zip(*curve.values()), color=colour, alpha=0.3, linewidth=1)
        alphas = list(curves[0])
        mean = np.mean([[curve[alpha] for alpha in alphas] for curve in curves], axis=0)
        ax.plot(mean[:, 0], mean[:, 1], color=colour, linewidth=2.5, marker="o",
                label=f"{label} (mean of {len(curves)} seed{'s' if len(curves) > 1 else ''})")
        for alpha, (x, y) in zip(alphas, mean):
            ax.annotate(alpha, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        drawn += 1
    if not drawn:
        raise FileNotFoundError(f"no complete discovery run of {experiment} in {runs_dir} for seeds {seeds}")
    ax.set(xlabel="held-out action NLL (nats per step)", ylabel="held-out KL (nats per step)",
           title=f"Rate-distortion over alpha ({experiment})")
    ax.legend(fontsize=7)
    return save(fig, runs_dir, experiment, "rate_distortion")


def switching_gate_figure(runs_dir: str | Path, experiment: str, seeds: list[int], num_episodes: int = 4) -> Path:
    """beta_t over held-out episodes above the ground-truth subgoal (coloured), for the alpha with
    the best switch F1 of the first complete seed, frozen base and co-trained side by side
    (paper Fig. 6 / A3)."""
    from hrl.experiment import DISCOVERY_ANALYSIS  # the stage writes the arrays; figures only read them

    stages = {}
    for stage in ("discovery", "discovery_cotrained"):
        try:
            seed, summary = next(iter(completed_summaries(runs_dir, experiment, stage, seeds).items()))
        except FileNotFoundError:
            continue
        stages[stage] = (seed, summary)
    if not stages:
        raise FileNotFoundError(f"no complete discovery run of {experiment} in {runs_dir} for seeds {seeds}")
    analyses = {stage: np.load(RunDir.path_for(runs_dir, experiment, stage, seed) / DISCOVERY_ANALYSIS)
                for stage, (seed, _) in stages.items()}
    num_episodes = min(num_episodes, *(len(data["mask"]) for data in analyses.values()))  # held-out episodes
    fig = Figure(figsize=(5 * len(stages), 1.4 * num_episodes))
    axes = fig.subplots(num_episodes, len(stages), squeeze=False, sharex=True)
    for column, (stage, (seed, summary)) in enumerate(stages.items()):
        best = max(summary["heldout_by_alpha"], key=lambda alpha: summary["heldout_by_alpha"][alpha]["f1"])
        data = analyses[stage]
        index = [f"{alpha:g}" for alpha in data["alphas"]].index(best)
        for row in range(num_episodes):
            ax = axes[row, column]
            length = int(data["mask"][row].sum())
            ax.imshow(data["subgoals"][row][None, :length], aspect="auto", cmap="tab10", vmin=0, vmax=9,
                      extent=(-0.5, length - 0.5, -0.25, -0.05))
            ax.plot(np.arange(length), data["beta"][index, row, :length], color="black", linewidth=1)
            ax.axhline(0.5, color="gray", linestyle=":", linewidth=0.8)
            ax.set(ylim=(-0.25, 1.05), yticks=[0, 0.5, 1], ylabel=f"episode {row}")
        stats = summary["heldout_by_alpha"][best]
        axes[0, column].set_title(f"{DISCOVERY_VARIANTS[stage][0]}, seed {seed}, alpha {best}: "
                                  f"F1 {stats['f1']:.2f}", fontsize=8)
        axes[-1, column].set_xlabel("time step (colour bar: ground-truth subgoal)")
    return save(fig, runs_dir, experiment, "switching_gate")


# Fig. 8's methods: stage -> (label, colour, the metric that is the success curve). The RL stages'
# curve is the success of their training batches; CRL's is its periodic evaluation.
RL_METHODS = {
    "internal_rl": ("internal RL", "tab:blue", "success_rate"),
    "grpo": ("raw-action GRPO", "tab:red", "success_rate"),
    "internal_rl_beta1": ("internal RL, beta = 1", "tab:gray", "success_rate"),
    "internal_rl_cotrained": ("internal RL, co-trained", "tab:orange", "success_rate"),
    "crl": ("CRL", "tab:green", "eval/success_rate"),
}


def success_curve(run_path: Path, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(training episodes, success) at every logged point of a run that has the metric."""
    rows = [row for row in read_metrics(run_path) if metric in row and "episodes" in row]
    return np.array([row["episodes"] for row in rows]), np.array([row[metric] for row in rows])


def expert_posttrain_success(runs_dir: str | Path, experiment: str, seeds: list[int]) -> float | None:
    """The trained expert's mean post-training success over the seeds (the ant's ant_expert stage),
    or None where there is no such stage or it never succeeds (the grid's planner needs none)."""
    try:
        summaries = completed_summaries(runs_dir, experiment, "ant_expert", seeds)
    except FileNotFoundError:
        return None
    success = float(np.mean([summary.get("posttrain_success_rate", 0.0) for summary in summaries.values()]))
    return success or None


class SuccessBand(NamedTuple):
    episodes: np.ndarray  # the first complete seed's logged training episodes
    low: np.ndarray  # 25th, 50th and 75th percentile over the seeds
    median: np.ndarray
    high: np.ndarray
    num_seeds: int


def success_band(runs_dir: str | Path, experiment: str, stage: str, seeds: list[int], scale: float = 1.0
                 ) -> SuccessBand | None:
    """Success / scale of one RL method of `RL_METHODS` against training episodes, over the seeds
    whose run is complete; None without a logged run."""
    metric = RL_METHODS[stage][2]
    try:
        complete = completed_summaries(runs_dir, experiment, stage, seeds)
    except FileNotFoundError:
        return None
    curves = [success_curve(RunDir.path_for(runs_dir, experiment, stage, seed), metric) for seed in complete]
    grid = curves[0][0]
    if len(grid) == 0:
        return None
    values = np.stack([np.interp(grid, episodes, success) for episodes, success in curves]) / scale
    return SuccessBand(grid, *np.percentile(values, [25, 50, 75], axis=0), num_seeds=len(curves))


def rl_success_figure(runs_dir: str | Path, experiment: str, seeds: list[int]) -> Path:
    """Post-training success against training episodes, median and interquartile range over the
    seeds, per method (paper Fig. 8): internal RL, raw-action GRPO, the beta = 1 and co-trained
    ablations, and CRL where its stage ran in this experiment. With a trained expert (the ant) the
    success is divided by the expert's post-training success, as in the paper's Fig. 8b."""
    expert = expert_posttrain_success(runs_dir, experiment, seeds)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    drawn = 0
    for stage, (label, colour, _) in RL_METHODS.items():
        band = success_band(runs_dir, experiment, stage, seeds, expert or 1.0)
        if band is None:
            continue
        plural = "s" if band.num_seeds > 1 else ""
        ax.plot(band.episodes, band.median, color=colour, linewidth=2, label=f"{label} ({band.num_seeds} seed{plural})")
        ax.fill_between(band.episodes, band.low, band.high, color=colour, alpha=0.2)
        drawn += 1
    if not drawn:
        raise FileNotFoundError(f"no complete RL run of {experiment} in {runs_dir} for seeds {seeds}")
    ylabel = f"success / the expert's ({expert:.2f})" if expert else "post-training task success"
    ax.set(xlabel="training episodes", ylabel=ylabel, ylim=(-0.02, max(1.02, ax.get_ylim()[1])),
           title=f"RL on the post-training task: median and IQR over seeds ({experiment})")
    ax.legend(fontsize=7)
    return save(fig, runs_dir, experiment, "rl_success")


FIGURES = (probe_accuracy_figure, controller_layer_sweep_figure, rate_distortion_figure, switching_gate_figure,
           rl_success_figure)


def write_figures(runs_dir: str | Path, experiment: str, seeds: list[int]) -> list[Path]:
    """Every figure whose stage is complete for at least one of the seeds."""
    written = []
    for figure in FIGURES:
        try:
            written.append(figure(runs_dir, experiment, seeds))
        except FileNotFoundError as missing:
            print(f"figures: {figure.__name__} skipped: {missing}")
    return written


def figure_script(figure, description: str) -> None:
    """The command line of an experiments/ figure script: --runs-dir, --experiment, --seeds."""
    import argparse
    import sys

    from hrl.cli import seed_list  # the command-line layer sits above this module

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--experiment", default="gridworld_quick")
    parser.add_argument("--seeds", type=seed_list, default=[0, 1, 2], help="comma-separated (default: 0,1,2)")
    args = parser.parse_args()
    try:
        print(f"wrote {figure(args.runs_dir, args.experiment, args.seeds)}")
    except FileNotFoundError as missing:
        sys.exit(f"{parser.prog}: {missing}")
