"""Scalar metrics to `metrics.jsonl` and TensorBoard, consistent across kill-and-resume.

Resuming from a checkpoint at step S re-runs every step after S, so whatever was logged after S
before the kill must disappear:
- metrics.jsonl is rewritten without the lines after S (and without a torn last line);
- TensorBoard gets a `SessionLog(START)` event at step S + 1 in a fresh event file. TensorBoard's
  Python reader (EventAccumulator) purges every event at a step >= S + 1 when it meets it, and the
  Rust data server drops the later records of a series as soon as an earlier step arrives again,
  so neither shows a step twice.
TensorBoard files are written with tensorboard's own writer and protos: no TensorFlow needed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Mapping

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from hrl.infra.rundir import METRICS_FILE


class MetricsWriter:
    """Appends `{"step", "wall_time", **metrics}` lines and TensorBoard scalars for one run."""

    def __init__(self, run_path: str | Path, resume_step: int = 0):
        """`resume_step`: the step the run restarts from; everything logged after it is dropped."""
        self.run_path = Path(run_path)
        self.latest: dict[str, float] = {}
        self._jsonl_path = self.run_path / METRICS_FILE
        self._keep_lines_up_to(resume_step)
        self._wait_past_existing_event_files()
        self._events = EventFileWriter(str(self.run_path))
        self._events.add_event(
            event_pb2.Event(
                wall_time=time.time(),
                step=resume_step + 1,
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
            )
        )
        self._events.flush()

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        wall_time = time.time()
        values = {name: float(value) for name, value in metrics.items()}
        with self._jsonl_path.open("a") as jsonl:
            jsonl.write(json.dumps({"step": step, "wall_time": wall_time, **values}) + "\n")
        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=name, simple_value=value) for name, value in values.items()]
        )
        self._events.add_event(event_pb2.Event(wall_time=wall_time, step=step, summary=summary))
        self._events.flush()
        self.latest.update(values)

    def close(self) -> None:
        self._events.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _wait_past_existing_event_files(self) -> None:
        """TensorBoard reads a run's event files in name order, and a name starts with the second
        it was created in, then host, pid and a per-process counter as strings: two files of the
        same second can sort backwards (counter "10" before "9") and the resume's START event would
        then come first. Starting in a later second keeps the order."""
        seconds = [int(path.name.split(".")[3]) for path in self.run_path.glob("events.out.tfevents.*")]
        while seconds and int(time.time()) <= max(seconds):
            time.sleep(0.05)

    def _keep_lines_up_to(self, resume_step: int) -> None:
        """Rewrite metrics.jsonl with the lines at steps <= resume_step, remembering their values."""
        if not self._jsonl_path.exists():
            return
        kept = records_up_to(self.run_path, resume_step)
        self.latest.update(latest_values(kept))
        temporary = self._jsonl_path.with_name(METRICS_FILE + ".tmp")
        temporary.write_text("".join(line + "\n" for line, _ in kept))
        os.replace(temporary, self._jsonl_path)


def records_up_to(run_path: str | Path, step: int) -> list[tuple[str, dict]]:
    """(line, record) of each record of a run's metrics.jsonl at a step <= `step`, in order; the
    torn last line of a killed run is skipped."""
    path = Path(run_path) / METRICS_FILE
    kept = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] <= step:
            kept.append((line, record))
    return kept


def latest_values(records: list[tuple[str, dict]]) -> dict[str, float]:
    """Each metric's last value in `records_up_to`'s records."""
    latest = {}
    for _, record in records:
        latest.update({k: v for k, v in record.items() if k not in ("step", "wall_time")})
    return latest


def read_metrics(run_path: str | Path) -> list[dict[str, float]]:
    """Every record of a run's metrics.jsonl, in order."""
    path = Path(run_path) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
