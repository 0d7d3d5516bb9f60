"""Config loading: every refusal happens before work starts and names the full dotted key."""

import dataclasses

import pytest
import yaml

from hrl.infra.config import ConfigError, available_presets, check, load_config, resolve_preset, to_dict, to_yaml


@dataclasses.dataclass
class Optim:
    learning_rate: float = 1e-3
    hidden_sizes: tuple[int, ...] = (64, 64)

    def validate(self) -> None:
        check(self.learning_rate > 0, "learning_rate", "must be > 0", self.learning_rate)
        check(all(h > 0 for h in self.hidden_sizes), "hidden_sizes", "must all be > 0", self.hidden_sizes)


@dataclasses.dataclass
class Schema:
    bc: Optim = dataclasses.field(default_factory=Optim)
    name: str = "demo"
    steps: int = 10
    debug: bool = False

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")  # plain ValueError works too


@pytest.fixture
def preset(tmp_path):
    path = tmp_path / "preset.yaml"
    path.write_text("name: from_preset\nbc:\n  learning_rate: 0.01\n")
    return path


def test_defaults_then_preset_then_overrides(preset):
    config = load_config(Schema, preset, ["bc.hidden_sizes=[8,4]", "steps=3", "debug=true"])
    assert config == Schema(bc=Optim(learning_rate=0.01, hidden_sizes=(8, 4)), name="from_preset", steps=3, debug=True)
    assert isinstance(config.bc.hidden_sizes, tuple)


@pytest.mark.parametrize(
    "override, message",
    [
        ("bc.lr=0.1", r"^bc\.lr: unknown key \(valid keys under bc: learning_rate, hidden_sizes\) \(from override 'bc.lr=0.1'\)$"),
        ("bc.learning_rate=fast", r"^bc\.learning_rate: Value 'fast' of type 'str' could not be converted to Float"),
        ("steps=2.5", r"^steps: .*could not be converted to Integer"),
        ("bc.learning_rate=-1.0", r"^bc\.learning_rate: must be > 0, got -1\.0$"),
        ("bc.hidden_sizes=[8,0]", r"^bc\.hidden_sizes: must all be > 0, got \(8, 0\)$"),
        ("steps=0", r"^steps: must be >= 1, got 0$"),
        ("steps", r"override 'steps' must look like key\.sub=value"),
    ],
)
def test_bad_overrides_are_refused_naming_the_key(preset, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Schema, preset, [override])


def test_unknown_key_in_a_preset_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("bc:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=rf"^bc\.learning_rat: unknown key .*from {path}"):
        load_config(Schema, path)


def test_wrong_type_in_a_preset_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("bc:\n  hidden_sizes: 7\n")
    with pytest.raises(ConfigError, match=r"^bc\.hidden_sizes: "):
        load_config(Schema, path)


def test_missing_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match=r"preset 'gridworld/nope' not found.*available presets: .*gridworld/quick"):
        resolve_preset("gridworld/nope")
    assert {"gridworld/quick", "gridworld/paper"} <= set(available_presets())
    assert resolve_preset("gridworld/quick").name == "quick.yaml"


def test_dump_round_trips_through_yaml(preset, tmp_path):
    config = load_config(Schema, preset, ["bc.hidden_sizes=[3]"])
    assert yaml.safe_load(to_yaml(config)) == to_dict(config)
    saved = tmp_path / "resolved.yaml"
    saved.write_text(to_yaml(config))
    assert load_config(Schema, saved) == config


@pytest.mark.parametrize("preset", available_presets())
def test_every_shipped_preset_loads_and_validates(preset):
    from hrl.experiment import ExperimentConfig

    config = load_config(ExperimentConfig, preset)
    assert config.env.make().name == config.env.name
