"""The paper's figures, drawn from the summaries in the run directories (never from live state).

Each function reads `runs/<experiment>/<stage>/seed_<k>/complete` for the given seeds (seeds
whose stage is unfinished are left out, with a note), draws one line per seed and their mean,
and writes `runs/<experiment>/figures/<name>.png`. `experiments/` holds one script per figure;
`hrl pipeline` calls `write_figures` after its stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

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


def plot_seeds_and_mean(ax, curves: dict[int, dict[int, float]]) -> None:
    """One thin line per seed and a bold mean over the seeds (at the layers they all have)."""
    for seed, curve in curves.items():
        layers = sorted(curve)
        ax.plot(layers, [curve[layer] for layer in layers], color="tab:blue", alpha=0.35, linewidth=1,
                label=f"seed {seed}")
    shared = sorted(set.intersection(*(set(curve) for curve in curves.values())))
    mean = [np.mean([curve[layer] for curve in curves.values()]) for layer in shared]
    ax.plot(shared, mean, color="tab:blue", linewidth=2.5, marker="o", label=f"mean of {len(curves)} seed{'s' if len(curves) > 1 else ''}")
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
    unsteered base model as the reference (paper Fig. 4)."""
    summaries = completed_summaries(runs_dir, experiment, "controllers", seeds)
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    plot_seeds_and_mean(ax, {seed: by_layer(s["posttrain_success_by_layer"]) for seed, s in summaries.items()})
    base = np.mean([s["base_posttrain_success"] for s in summaries.values()])
    ax.axhline(base, color="tab:red", linestyle="--", label="unsteered base model (mean)")
    ax.set(xlabel="controlled layer l (0: embedding)", ylabel="post-training success rate", ylim=(-0.02, 1.02),
           title=f"Chained supervised controllers ({experiment})")
    ax.legend(fontsize=7)
    return save(fig, runs_dir, experiment, "controller_layer_sweep")


FIGURES = (probe_accuracy_figure, controller_layer_sweep_figure)


def write_figures(runs_dir: str | Path, experiment: str, seeds: list[int]) -> list[Path]:
    """Every figure whose stage is complete for at least one of the seeds."""
    written = []
    for figure in FIGURES:
        try:
            written.append(figure(runs_dir, experiment, seeds))
        except FileNotFoundError as missing:
            print(f"figures: {figure.__name__} skipped: {missing}")
    return written
