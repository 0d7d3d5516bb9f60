"""The train state every gradient-based algorithm carries through `lax.scan` and checkpoints.

The flax nnx module is split once (`nnx.split`): its parameters are a plain pytree in the state
and its graph definition is static data, so everything runs under plain `jax.jit` (`nnx.jit`
costs milliseconds per call) and orbax checkpoints parameters, optimiser state and key alike.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx, struct


@struct.dataclass
class TrainState:
    params: nnx.State
    opt_state: optax.OptState
    key: jax.Array  # all of the algorithm's randomness, so a resumed run repeats the same draws
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)

    @classmethod
    def create(cls, module: nnx.Module, optimizer: optax.GradientTransformation, key: jax.Array) -> "TrainState":
        graphdef, params = nnx.split(module)
        return cls(params=params, opt_state=optimizer.init(params), key=key, graphdef=graphdef)

    def module(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params)


def adamw(learning_rate: float | optax.Schedule, weight_decay: float, max_grad_norm: float,
          decay_kernels_only: bool = False) -> optax.GradientTransformation:
    """AdamW after clipping the global gradient norm: the optimiser of every supervised phase.
    With `decay_kernels_only`, weight decay leaves biases, norms and position biases alone."""
    mask = kernels if decay_kernels_only else None
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adamw(learning_rate, weight_decay=weight_decay, mask=mask))


def kernels(params) -> object:
    """The pytree of `params` with True at every weight matrix named "kernel", else False."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(getattr(key, "key", None) == "kernel" for key in path), params)


def independent_along_leading_axis(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optimizer` applied to each slice along the leading axis of every parameter on its own,
    gradient clipping included: several independent models trained side by side in one update
    (one probe per layer, one controller set per layer), each exactly as if trained alone."""
    return optax.GradientTransformation(jax.vmap(optimizer.init), jax.vmap(optimizer.update))
