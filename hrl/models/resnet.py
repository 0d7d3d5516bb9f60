"""The deep residual MLP of CRL's depth-scaling result (Wang et al. 2025, "1000 Layer Networks").

    input Dense -> LayerNorm -> Swish
    depth / 4 residual blocks, each: x + 4 x (Dense -> LayerNorm -> Swish)(x)
    linear head

"Depth" counts the Dense layers inside the blocks (depth 64 = 16 blocks), as the paper does: the
input layer and the head come on top. The paper's ablations (no LayerNorm, ReLU instead of Swish:
deep networks then fail) are switches of the config.

The blocks are stacked along a leading axis and run with `lax.scan`, so a depth-64 network
compiles as fast as a depth-4 one: XLA sees one block whatever the depth.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from hrl.infra.config import check

LAYERS_PER_BLOCK = 4
ACTIVATIONS = {"swish": jax.nn.swish, "relu": jax.nn.relu}


@dataclasses.dataclass
class ResNetConfig:
    """Paper: width 256, depth 4 (their baseline) up to 1024; LayerNorm and Swish."""

    depth: int = 4  # Dense layers inside residual blocks: a multiple of 4
    width: int = 256
    layer_norm: bool = True  # paper ablation: without it depth 64 fails
    activation: str = "swish"  # "swish" (paper) or "relu" (paper ablation)

    def validate(self) -> None:
        check(self.depth >= LAYERS_PER_BLOCK and self.depth % LAYERS_PER_BLOCK == 0, "depth",
              f"must be a positive multiple of {LAYERS_PER_BLOCK}", self.depth)
        check(self.width >= 1, "width", "must be >= 1", self.width)
        check(self.activation in ACTIVATIONS, "activation", f"must be one of {tuple(ACTIVATIONS)}", self.activation)

    @property
    def num_blocks(self) -> int:
        return self.depth // LAYERS_PER_BLOCK


class DenseNormAct(nnx.Module):
    """Dense -> LayerNorm -> activation: the unit every layer of the network is made of."""

    def __init__(self, in_features: int, cfg: ResNetConfig, rngs: nnx.Rngs):
        self.dense = nnx.Linear(in_features, cfg.width, rngs=rngs)
        self.norm = nnx.LayerNorm(cfg.width, rngs=rngs) if cfg.layer_norm else None
        self.activation = cfg.activation

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.dense(x)
        if self.norm is not None:
            x = self.norm(x)
        return ACTIVATIONS[self.activation](x)


class ResidualBlock(nnx.Module):
    def __init__(self, cfg: ResNetConfig, rngs: nnx.Rngs):
        self.layers = nnx.List([DenseNormAct(cfg.width, cfg, rngs) for _ in range(LAYERS_PER_BLOCK)])

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        for layer in self.layers:
            h = layer(h)
        return x + h


class ResidualMLP(nnx.Module):
    """[..., in_features] -> [..., out_features]."""

    def __init__(self, in_features: int, out_features: int, cfg: ResNetConfig, rngs: nnx.Rngs):
        self.input = DenseNormAct(in_features, cfg, rngs)
        self.blocks = _stacked_blocks(cfg, rngs.params())
        self.head = nnx.Linear(cfg.width, out_features, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.input(x.astype(jnp.float32))
        graphdef, stacked = nnx.split(self.blocks)

        def block(h, params):
            return nnx.merge(graphdef, params)(h), None

        x, _ = jax.lax.scan(block, x, stacked)
        return self.head(x)


def _stacked_blocks(cfg: ResNetConfig, key: jax.Array) -> ResidualBlock:
    """`cfg.num_blocks` independently initialised blocks, their parameters stacked on axis 0."""

    @nnx.vmap(in_axes=0, out_axes=0)
    def make(block_key):
        return ResidualBlock(cfg, nnx.Rngs(params=block_key))

    return make(jax.random.split(key, cfg.num_blocks))


def dense_layer_count(params: nnx.State) -> dict[str, int]:
    """Dense layers of a ResidualMLP's parameters: inside the blocks (the paper's "depth") and in
    all (depth + the input layer + the head)."""
    inside = 0
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = [getattr(key, "key", None) for key in path]  # dict keys; drops the trailing ".value"
        names = [name for name in names if name is not None]
        if names[-2:] != ["dense", "kernel"] and names[-2:] != ["head", "kernel"]:
            continue
        layers = leaf.shape[0] if "blocks" in names else 1  # stacked: one kernel per block
        total += layers
        inside += layers if "blocks" in names else 0
    return {"inside_blocks": inside, "total": total}
