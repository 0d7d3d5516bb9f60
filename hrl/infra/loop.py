"""The host loop every algorithm uses: resume, run jitted chunks, log, evaluate, checkpoint.

An algorithm provides a pure, jitted `train_chunk(state) -> (state, metrics)` that runs many
updates in `lax.scan` (metrics: a dict of scalar arrays). The host touches the device once per
chunk, to fetch those scalars. All randomness must come from the key inside `state`, so a run
resumed from a checkpoint ends with exactly the numbers of an uninterrupted one.

Per chunk: run it, fetch metrics, stop if any is not finite (the bad state is never saved),
evaluate if due, log everything at the global step, then checkpoint if due. Logging before
checkpointing means a checkpoint at step S implies everything up to S was logged; a resume
from S drops whatever was logged after S (see `hrl.infra.metrics`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
from jax.sharding import Mesh
from tqdm.auto import tqdm

from hrl.infra.checkpoint import Checkpointer
from hrl.infra.config import check
from hrl.infra.mesh import is_logging_process, replicate, replicated
from hrl.infra.metrics import MetricsWriter, latest_values, records_up_to
from hrl.infra.rundir import RunDir

State = Any
Metrics = Mapping[str, Any]


class NonFiniteMetricError(RuntimeError):
    """Training produced a NaN or infinite metric; the message names it, the step and the last good checkpoint."""


@dataclasses.dataclass
class LoopConfig:
    """How often the host loop checkpoints and evaluates (in chunks), and how it reports."""

    checkpoint_every: int = 10  # chunks; the last chunk is always checkpointed
    keep_checkpoints: int = 3  # newest checkpoints kept on disk
    eval_every: int = 10  # chunks; 0 evaluates only after the last chunk
    progress: bool = True  # tqdm progress bar on stderr

    def validate(self) -> None:
        check(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1", self.checkpoint_every)
        check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1", self.keep_checkpoints)
        check(self.eval_every >= 0, "eval_every", "must be >= 0", self.eval_every)


@dataclasses.dataclass
class TrainResult:
    state: State
    step: int
    summary: dict[str, Any]  # final metrics and timings, ready for `RunDir.mark_complete`


def run_training(
    run: RunDir,
    initial_state: State,
    train_chunk: Callable[[State], tuple[State, Metrics]],
    num_chunks: int,
    *,
    steps_per_chunk: int = 1,
    loop: LoopConfig = LoopConfig(),
    evaluate: Callable[[State], Metrics] | None = None,
    description: str = "train",
    mesh: Mesh | None = None,
) -> TrainResult:
    """Run chunks up to `num_chunks`; the global step after chunk c is `(c + 1) * steps_per_chunk`.

    Resumes from the newest checkpoint in `run` if there is one. Raises `NonFiniteMetricError`
    on the first non-finite training metric. With a `mesh` (see `hrl.infra.mesh`) the state is
    replicated on its devices, and `train_chunk` should be the algorithm's chunk for that mesh.
    On several processes every process runs this loop (checkpoints are collective); only process
    0 writes metrics and shows progress.
    """
    (result,) = _run([run], _ONE_RUN, initial_state, train_chunk, num_chunks, steps_per_chunk, loop, evaluate,
                     description, mesh)
    return result


def run_training_seeds(
    runs: Sequence[RunDir],
    initial_states: State,
    train_chunk: Callable[[State], tuple[State, Metrics]],
    num_chunks: int,
    *,
    steps_per_chunk: int = 1,
    loop: LoopConfig = LoopConfig(),
    evaluate: Callable[[State], Metrics] | None = None,
    description: str = "train",
    mesh: Mesh | None = None,
) -> list[TrainResult]:
    """`run_training` for several seeds trained by one vmapped program (see `vmap_seeds`).

    Seed k is index k of the leading axis of the state, of every metric and of every evaluation
    value; it logs and checkpoints into `runs[k]` exactly as a run of its own would, so each run
    directory reads (and its checkpoint restores) like a single-seed run's. Resumes from the newest
    step that every run has checkpointed (a kill between two seeds' saves loses at most one save).
    """
    check(len(runs) >= 1, "runs", "must name at least one run directory", len(runs))
    return _run(list(runs), _SEED_AXIS, initial_states, train_chunk, num_chunks, steps_per_chunk, loop, evaluate,
                description, mesh)


def vmap_seeds(make_fn: Callable[[Any], Callable], constants: Any) -> Callable[[State], Any]:
    """A jitted `fn(states)` running one seed per leading index of the state: a chunk, an evaluation.

    `make_fn(seed_constants)` builds one seed's function from that seed's slice of `constants`
    (frozen models, datasets, keys: arrays stacked on a leading seed axis). The constants enter the
    program as arguments, not closed-over values, which XLA would fold into the compiled program.
    """
    @jax.jit
    def batched(states: State, constants: Any):
        return jax.vmap(lambda state, seed_constants: make_fn(seed_constants)(state))(states, constants)

    return _WithConstants(batched, constants)


class _WithConstants:
    """`fn(state, constants)` called as `fn(state)`, ahead-of-time compilable like a jitted function."""

    def __init__(self, fn: Callable, constants: Any):
        self.fn, self.constants = fn, constants

    def __call__(self, state: State) -> Any:
        return self.fn(state, self.constants)

    def lower(self, state: State) -> types.SimpleNamespace:
        lowered = self.fn.lower(state, self.constants)
        return types.SimpleNamespace(compile=lambda: _WithConstants(lowered.compile(), self.constants))


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How the runs of one program share its state: one run, or one per index of a seed axis."""

    split: Callable[[Any, int], list[Any]]  # (tree, number of runs) -> one tree per run
    stack: Callable[[list[Any]], Any]  # the inverse


def stack_seeds(trees: Sequence[Any]) -> Any:
    """The trees (one per seed, the same structure) stacked along a new leading seed axis."""
    return jax.tree.map(lambda *leaves: jax.numpy.stack(leaves), *trees)


_ONE_RUN = _Layout(split=lambda tree, _: [tree], stack=lambda trees: trees[0])
_SEED_AXIS = _Layout(split=lambda tree, n: [jax.tree.map(lambda x: x[k], tree) for k in range(n)], stack=stack_seeds)


def _run(runs: list[RunDir], layout: _Layout, initial_state: State, train_chunk: Callable, num_chunks: int,
         steps_per_chunk: int, loop: LoopConfig, evaluate: Callable | None, description: str,
         mesh: Mesh | None) -> list[TrainResult]:
    final_step = num_chunks * steps_per_chunk
    initial_state = replicate(initial_state, mesh)  # before the restore: restored arrays take its sharding
    train_chunk = _replicated_in_and_out(train_chunk, mesh)
    with contextlib.ExitStack() as stack:
        checkpointers = [stack.enter_context(Checkpointer(run.checkpoint_dir, keep_last=loop.keep_checkpoints))
                         for run in runs]
        start_step, state = _restore(checkpointers, layout, initial_state)
        summaries = [{"step": final_step, "resumed_from_step": start_step, "compile_s": 0.0, "run_s": 0.0}
                     for _ in runs]
        chunks = range(start_step // steps_per_chunk, num_chunks)
        writers = [stack.enter_context(MetricsWriter(run.path, resume_step=start_step) if is_logging_process()
                                       else _LatestOnly(run.path, start_step)) for run in runs]
        bar = stack.enter_context(_progress_bar(chunks, loop, description))
        compile_s = 0.0
        if chunks:
            train_chunk, compile_s = _compile(train_chunk, state)
        for chunk in chunks:
            step = (chunk + 1) * steps_per_chunk
            is_last = chunk == chunks[-1]
            start = time.perf_counter()
            new_state, metrics = train_chunk(state)
            metrics = jax.device_get(dict(metrics))  # the one host transfer per chunk; waits for the device
            seconds = time.perf_counter() - start
            per_run = [_to_floats(values) for values in layout.split(metrics, len(runs))]
            for values, checkpointer in zip(per_run, checkpointers):
                _stop_if_not_finite(values, step, checkpointer)
            state = new_state
            if evaluate is not None and (is_last or _is_due(chunk, loop.eval_every)):
                evaluations = layout.split(jax.device_get(dict(evaluate(state))), len(runs))
                for values, evaluation in zip(per_run, evaluations):
                    values.update({f"eval/{name}": value for name, value in _to_floats(evaluation).items()})
            for values, writer, summary in zip(per_run, writers, summaries):
                values.update({"time/chunk_s": seconds, "time/steps_per_s": steps_per_chunk / seconds})
                if chunk == chunks[0]:
                    values["time/compile_s"] = summary["compile_s"] = compile_s
                summary["run_s"] += seconds
                writer.write(step, values)
            bar.set_postfix({k: f"{v:.4g}" for k, v in per_run[0].items() if not k.startswith("time/")}, refresh=False)
            bar.update()
            if is_last or _is_due(chunk, loop.checkpoint_every):
                for checkpointer, seed_state in zip(checkpointers, layout.split(state, len(runs))):
                    checkpointer.save(step, seed_state)
        for summary, writer in zip(summaries, writers):
            summary["metrics"] = dict(writer.latest)
    return [TrainResult(state=seed_state, step=final_step, summary=summary)
            for seed_state, summary in zip(layout.split(state, len(runs)), summaries)]


def _restore(checkpointers: list[Checkpointer], layout: _Layout, initial_state: State) -> tuple[int, State]:
    """(step, state) from the newest step every run has checkpointed, or (0, initial_state)."""
    common = set.intersection(*(set(checkpointer.all_steps()) for checkpointer in checkpointers))
    if not common:
        return 0, initial_state
    step = max(common)
    likes = layout.split(initial_state, len(checkpointers))
    states = []
    for checkpointer, like in zip(checkpointers, likes):
        checkpointer.delete_after(step)  # a later save of some seeds only; it is redone
        states.append(checkpointer.restore(step, like))
    return step, layout.stack(states)


class _LatestOnly:
    """The metrics writer of a process that does not log: it only keeps the latest values, which
    every process needs for its summary (on a resume, those process 0 logged up to the restart)."""

    def __init__(self, run_path: Path, resume_step: int):
        self.latest: dict[str, float] = latest_values(records_up_to(run_path, resume_step))

    def write(self, step: int, metrics: Metrics) -> None:
        self.latest.update(metrics)

    def __enter__(self) -> "_LatestOnly":
        return self

    def __exit__(self, *exc_info) -> None:
        pass


def _replicated_in_and_out(train_chunk: Callable, mesh: Mesh | None) -> Callable:
    """Pin the state and metrics a chunk returns to replicated: the next chunk's compiled program
    expects the state as it was given, whatever layout XLA would otherwise pick for the outputs."""
    if mesh is None:
        return train_chunk
    return jax.jit(train_chunk, in_shardings=replicated(mesh), out_shardings=replicated(mesh))


def _compile(train_chunk: Callable, state: State) -> tuple[Callable, float]:
    """Compile ahead of time, so compile time is measured apart from steady-state run time."""
    start = time.perf_counter()
    compiled = train_chunk.lower(state).compile() if hasattr(train_chunk, "lower") else train_chunk
    return compiled, time.perf_counter() - start


def _to_floats(metrics: Metrics) -> dict[str, float]:
    return {name: float(value) for name, value in jax.device_get(dict(metrics)).items()}


def _is_due(chunk: int, every: int) -> bool:
    return every > 0 and (chunk + 1) % every == 0


def _stop_if_not_finite(values: Mapping[str, float], step: int, checkpointer: Checkpointer) -> None:
    bad = {name: value for name, value in values.items() if not math.isfinite(value)}
    if not bad:
        return
    last_good = checkpointer.latest_step()
    kept = (f"last good checkpoint: step {last_good} in {checkpointer.directory}" if last_good is not None
            else "no checkpoint was saved before it")
    named = ", ".join(f"{name}={value}" for name, value in bad.items())
    raise NonFiniteMetricError(f"non-finite metric at step {step}: {named}; stopped without saving that state; {kept}")


def _progress_bar(chunks: range, loop: LoopConfig, description: str) -> tqdm:
    # Without a terminal (a log file, CI), redraw rarely so the log is not flooded.
    interactive = sys.stderr.isatty()
    return tqdm(
        total=chunks.stop, initial=chunks.start, desc=description, unit="chunk", disable=not (loop.progress and is_logging_process()),
        mininterval=0.1 if interactive else 30.0, dynamic_ncols=interactive, file=sys.stderr,
    )
