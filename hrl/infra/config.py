"""Typed configuration: dataclass schemas, YAML presets and `key.sub=value` overrides.

A config is a tree of dataclasses (the schema). A preset in `configs/<env>/<name>.yaml` sets
some of its fields, command-line overrides set more, and OmegaConf checks every key and type
against the schema while merging. Then each dataclass in the tree may check its own values in
an optional `validate(self) -> None` that raises `ValueError("field: must be ..., got ...")`;
the walker here prefixes the dotted path, so every refusal names the full key
(`bc.learning_rate: must be > 0, got -1.0`). All of this happens before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

REPO_ROOT = Path(__file__).resolve().parents[2]
PRESETS_DIR = REPO_ROOT / "configs"

T = TypeVar("T")


class ConfigError(ValueError):
    """A user error in a config: the CLI prints its one-line message and exits with code 2."""


def check(condition: bool, key: str, requirement: str, value: Any) -> None:
    """Raise `ConfigError("key: requirement, got value")` unless `condition` holds.

    A helper for `validate` methods, e.g. `check(self.lr > 0, "lr", "must be > 0", self.lr)`.
    """
    if not condition:
        raise ConfigError(f"{key}: {requirement}, got {value!r}")


# ----------------------------------------------------------------------------------------------
# Presets


def available_presets() -> list[str]:
    """Names like `gridworld/quick` of every YAML file under `<repo>/configs`."""
    return sorted(str(p.relative_to(PRESETS_DIR).with_suffix("")) for p in PRESETS_DIR.glob("*/*.yaml"))


def resolve_preset(preset: str | Path) -> Path:
    """Map `gridworld/quick` to `<repo>/configs/gridworld/quick.yaml`; a `.yaml` path is taken as is."""
    preset = str(preset)
    path = Path(preset) if preset.endswith((".yaml", ".yml")) else PRESETS_DIR / f"{preset}.yaml"
    if not path.is_file():
        listing = ", ".join(available_presets()) or "none"
        raise ConfigError(f"preset {preset!r} not found (looked for {path}); available presets: {listing}")
    return path


# ----------------------------------------------------------------------------------------------
# Loading


def load_config(schema: type[T], preset: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Schema defaults, then the preset, then each `key.sub=value` override; checked and validated.

    Returns an instance of `schema` (plain dataclasses all the way down). Raises `ConfigError`
    naming the dotted key for unknown keys, wrong types and invalid values.
    """
    merged = OmegaConf.structured(schema)
    if preset is not None:
        path = resolve_preset(preset)
        merged = _merge(merged, _read_yaml(path), source=str(path))
    for override in overrides:
        merged = _merge(merged, _parse_override(override), source=f"override {override!r}")
    try:
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ConfigError(_describe(error)) from None
    return finalize(config)


def finalize(config: T) -> T:
    """Turn lists back into tuples where the schema says tuple, then validate the whole tree."""
    _restore_tuples(config)
    _validate_tree(config, prefix="")
    return config


def _read_yaml(path: Path) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read preset {path}: {error}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"preset {path} must be a mapping of sections, got a {type(loaded).__name__}")
    return loaded


def _parse_override(override: str) -> DictConfig:
    key, sep, _ = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    try:
        return OmegaConf.from_dotlist([override])
    except (OmegaConfBaseException, yaml.YAMLError) as error:
        first_line = str(error).splitlines()[0]
        raise ConfigError(f"{key}: cannot parse value in override {override!r} ({first_line})") from None


def _merge(base: DictConfig, update: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{_describe(error, base)} (from {source})") from None


def _describe(error: OmegaConfBaseException, base: DictConfig | None = None) -> str:
    """One line naming the full dotted key, from OmegaConf's multi-line message."""
    key = getattr(error, "full_key", None) or "<root>"
    if isinstance(error, ConfigKeyError) and base is not None:
        parent_key = key.rpartition(".")[0]
        parent = OmegaConf.select(base, parent_key) if parent_key else base
        valid = ", ".join(parent.keys()) if isinstance(parent, DictConfig) else "none"
        where = f" under {parent_key}" if parent_key else ""
        return f"{key}: unknown key (valid keys{where}: {valid})"
    message = getattr(error, "msg", None) or str(error)
    return f"{key}: {message.splitlines()[0]}"


# ----------------------------------------------------------------------------------------------
# Validation walker


def _validate_tree(node: Any, prefix: str) -> None:
    """Children first, so a parent's cross-field checks can rely on valid children."""
    if not dataclasses.is_dataclass(node):
        return
    for field in dataclasses.fields(node):
        _validate_tree(getattr(node, field.name), f"{prefix}{field.name}.")
    validate = getattr(node, "validate", None)
    if validate is None:
        return
    try:
        validate()
    except ValueError as error:  # ConfigError included: a schema needs no import from hrl.infra
        raise ConfigError(f"{prefix}{error}") from None


def _restore_tuples(node: Any) -> None:
    """OmegaConf hands back lists for `tuple[...]` fields; tuples keep configs immutable-looking."""
    if not dataclasses.is_dataclass(node):
        return
    hints = typing.get_type_hints(type(node))
    for field in dataclasses.fields(node):
        value = getattr(node, field.name)
        if isinstance(value, list) and _is_tuple_type(hints.get(field.name)):
            object.__setattr__(node, field.name, tuple(value))
        _restore_tuples(value)


def _is_tuple_type(annotation: Any) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_tuple_type(arg) for arg in typing.get_args(annotation))
    return annotation is tuple or typing.get_origin(annotation) is tuple


# ----------------------------------------------------------------------------------------------
# Dumping


def to_dict(config: Any) -> dict[str, Any]:
    """A plain nested dict (tuples as lists), as it is saved in YAML."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def to_yaml(config: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config), resolve=True)


def save_yaml(config: Any, path: str | Path) -> None:
    Path(path).write_text(to_yaml(config))
