"""Which base model a config builds: the causal transformer (the grid's, `hrl.models.transformer`)
or the Hawk recurrent model (the ant's, `hrl.models.hawk`), with the heads the environment's spaces
call for (`hrl.models.heads`). Both share `ResidualStreamModel`'s interface, so every stage runs on
either unchanged.

`ModelConfig` is the experiment config's `model` section: one flat schema with a `backbone` name,
the sizes both backbones have, and each backbone's own fields (marked), which the other ignores.
Flat rather than one subsection per backbone so that the grid's presets and command-line
overrides (`model.num_layers=...`) read as before.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from hrl.models.hawk import Hawk, HawkConfig
from hrl.models.heads import ActionSpec, ObservationSpec
from hrl.models.transformer import ResidualStreamModel, Transformer, TransformerConfig

BACKBONES = ("transformer", "hawk")


@dataclasses.dataclass
class ModelConfig:
    """Paper: the grid's transformer (6 blocks, width 256, 4 heads of 64, MLP 512, 32 position
    buckets, initialiser variance scale 0.1); the ant's Hawk (8 blocks, width 256, MLP 512). The
    defaults are the transformer's (see `TransformerConfig` and `HawkConfig` for each field)."""

    backbone: str = "transformer"  # "transformer" or "hawk"
    num_layers: int = 6
    width: int = 256
    mlp_width: int = 512
    init_scale: float = 0.1
    max_len: int = 100  # the longest rollout (the horizon): the transformer's cache length
    encoder: str = "flat"
    # transformer only
    num_heads: int = 4
    relpos_buckets: int = 32
    relpos_max_distance: int = 128
    relpos_init_slope: float = 0.0
    embed_moves: bool = False
    # hawk only
    rnn_width: int = 256
    conv_width: int = 4

    def validate(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone: must be one of {BACKBONES}, got {self.backbone!r}")
        if self.embed_moves and self.backbone != "transformer":
            raise ValueError("embed_moves: only the transformer embeds the grid agent's moves")
        self.backbone_config().validate()

    def backbone_config(self) -> TransformerConfig | HawkConfig:
        """The chosen backbone's own config, from the fields it has."""
        schema = TransformerConfig if self.backbone == "transformer" else HawkConfig
        return schema(**{field.name: getattr(self, field.name) for field in dataclasses.fields(schema)})


def make_model(cfg: ModelConfig | TransformerConfig | HawkConfig, observation: ObservationSpec, action: ActionSpec, *,
               grid_shape: tuple[int, int, int] | None = None, rngs: nnx.Rngs) -> ResidualStreamModel:
    """The base model `cfg` describes, with the heads of `observation` and `action` (the
    environment's spaces; ints mean the grid's bits and discrete actions, see `ResidualStreamModel`)."""
    if isinstance(cfg, ModelConfig):
        cfg = cfg.backbone_config()
    backbone = Transformer if isinstance(cfg, TransformerConfig) else Hawk
    return backbone(cfg, observation, action, grid_shape=grid_shape, rngs=rngs)
