"""Self-describing run directories: `runs/<experiment>/<stage>/seed_<k>/`.

A run directory holds everything one stage of one seed produced:

    config.yaml     the resolved config of the stage (what the outputs depend on)
    events.out.*    TensorBoard event files          (see `hrl.infra.metrics`)
    metrics.jsonl   one JSON object per log call     (see `hrl.infra.metrics`)
    checkpoints/    orbax checkpoints                (see `hrl.infra.checkpoint`)
    complete        JSON summary, written last: the stage finished and can be skipped

Opening a directory that exists with the same config resumes it; with a different config it
is refused (the outputs would mix two experiments) unless `overwrite=True` wipes it first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import yaml

from hrl.infra.config import ConfigError, to_dict
from hrl.infra.mesh import is_logging_process

CONFIG_FILE = "config.yaml"
COMPLETE_FILE = "complete"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"


class ConfigMismatchError(ConfigError):
    """The run directory exists and was made with a different config."""


class RunDir:
    """One stage of one seed of one experiment, on disk."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @staticmethod
    def path_for(runs_dir: str | Path, experiment: str, stage: str, seed: int) -> Path:
        return Path(runs_dir) / experiment / stage / f"seed_{seed}"

    @classmethod
    def open(cls, path: str | Path, config: Any, *, overwrite: bool = False) -> "RunDir":
        """Create the directory, or resume it if its saved config equals `config`.

        `config` is a config dataclass (or a dict of them): only what this stage's outputs
        depend on, so that changing a later stage's settings does not invalidate this one.
        """
        run = cls(path)
        if overwrite and run.path.exists():
            shutil.rmtree(run.path)
        resolved = to_dict(config)
        saved = run.saved_config()
        if saved is not None:  # a key added to the schema since the run was made reads as its default
            saved = _with_missing_keys(saved, _defaults(config))
        if saved is not None and saved != resolved:
            raise ConfigMismatchError(
                f"{run.path} was made with a different config ({_describe_differences(saved, resolved)}); "
                "use another experiment name, or overwrite to start it afresh"
            )
        run.path.mkdir(parents=True, exist_ok=True)
        if saved is None:
            _write_atomically(run.path / CONFIG_FILE, yaml.safe_dump(resolved, sort_keys=False))
        return run

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT_DIR

    def saved_config(self) -> dict[str, Any] | None:
        config_path = self.path / CONFIG_FILE
        return yaml.safe_load(config_path.read_text()) if config_path.is_file() else None

    @property
    def is_complete(self) -> bool:
        return (self.path / COMPLETE_FILE).is_file()

    def summary(self) -> dict[str, Any] | None:
        """The summary written by `mark_complete`, or None while the stage is unfinished."""
        return json.loads((self.path / COMPLETE_FILE).read_text()) if self.is_complete else None

    def mark_complete(self, summary: Mapping[str, Any]) -> None:
        _write_atomically(self.path / COMPLETE_FILE, json.dumps(dict(summary), indent=2, sort_keys=True))


def _defaults(config: Any) -> Any:
    """The config as its schema's defaults would have it (None where the schema gives none)."""
    if isinstance(config, dict):
        return {key: _defaults(value) for key, value in config.items()}
    if dataclasses.is_dataclass(config):
        try:
            return to_dict(type(config)())
        except TypeError:  # a field without a default
            return None
    return None


def _with_missing_keys(saved: Any, defaults: Any) -> Any:
    """`saved` with the keys it lacks taken from `defaults`, at every depth."""
    if not (isinstance(saved, dict) and isinstance(defaults, dict)):
        return saved
    return {**{key: value for key, value in defaults.items() if key not in saved},
            **{key: _with_missing_keys(value, defaults.get(key)) for key, value in saved.items()}}


def _describe_differences(saved: Any, new: Any, prefix: str = "") -> str:
    """`bc.learning_rate: 0.001 -> 0.01; ...` for every leaf that differs."""
    if isinstance(saved, dict) and isinstance(new, dict):
        parts = [
            _describe_differences(saved.get(key, "<absent>"), new.get(key, "<absent>"), f"{prefix}{key}.")
            for key in [*saved, *(key for key in new if key not in saved)]
            if saved.get(key, "<absent>") != new.get(key, "<absent>")
        ]
        return "; ".join(parts)
    return f"{prefix.rstrip('.')}: {saved!r} -> {new!r}"


def _write_atomically(path: Path, text: str) -> None:
    """Write then rename, so a kill never leaves a half-written file under the final name. On
    several processes sharing the run directory only process 0 writes (two writers would race
    on the temporary file)."""
    if not is_logging_process():
        return
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
