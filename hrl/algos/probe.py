"""Linear probes: how well the frozen base model's residual stream encodes the current subgoal.

For every layer l = 0..L (e_0 is the embedding), a softmax-linear probe reads e_{t,l} and predicts
the ground-truth subgoal of step t (`dataset.subgoals`, which the model never saw). The L + 1 probes
train side by side in one update, each with its own optimiser state, so each layer's numbers are
exactly those of a probe trained alone. The base model is closed over as a constant: its
parameters are not in the train state and get no gradient.

Data: D, split by episode index; the last `heldout_fraction` of the episodes are never trained on
and give the accuracy. Paper (Fig. 3 / A1): accuracy rises from about 30% to about 50% around
mid-depth.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hrl.infra.config import check
from hrl.infra.mesh import Mesh, shard_batch
from hrl.infra.train_state import TrainState, adamw, independent_along_leading_axis
from hrl.models.transformer import Transformer


@dataclasses.dataclass
class ProbeConfig:
    """The paper gives no probe training settings: these are ours."""

    learning_rate: float = 1e-3
    weight_decay: float = 0.0  # a probe measures what is linearly readable: no prior towards small weights
    max_grad_norm: float = 1.0
    batch_size: int = 64  # episodes per update (and per evaluation batch)
    num_updates: int = 2000
    updates_per_chunk: int = 100
    heldout_fraction: float = 0.2  # the last episodes of D, by index

    def validate(self) -> None:
        for name in ("learning_rate", "max_grad_norm", "batch_size", "num_updates", "updates_per_chunk"):
            check(getattr(self, name) > 0, name, "must be > 0", getattr(self, name))
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        check(0 < self.heldout_fraction < 1, "heldout_fraction", "must be in (0, 1)", self.heldout_fraction)
        check(self.num_updates % self.updates_per_chunk == 0, "num_updates",
              f"must be a multiple of updates_per_chunk ({self.updates_per_chunk})", self.num_updates)

    @property
    def num_chunks(self) -> int:
        return self.num_updates // self.updates_per_chunk


class LayerProbes(nnx.Module):
    """One softmax-linear probe per layer, logits_l = e_l W_l + b_l, stacked on a leading layer axis."""

    def __init__(self, num_probes: int, width: int, num_classes: int):
        # Zero weights: the problem is convex, so the start does not matter; zero is the uniform guess.
        self.kernel = nnx.Param(jnp.zeros((num_probes, width, num_classes)))
        self.bias = nnx.Param(jnp.zeros((num_probes, num_classes)))

    def __call__(self, residuals: jax.Array) -> jax.Array:
        """residuals [P, ..., width] -> logits [P, ..., classes]."""
        logits = jnp.einsum("p...w,pwc->p...c", residuals, self.kernel[...])
        return logits + jnp.expand_dims(self.bias[...], tuple(range(1, residuals.ndim - 1)))


def make_optimizer(cfg: ProbeConfig) -> optax.GradientTransformation:
    return independent_along_leading_axis(adamw(cfg.learning_rate, cfg.weight_decay, cfg.max_grad_norm))


def init(key: jax.Array, cfg: ProbeConfig, base: Transformer, num_subgoals: int) -> TrainState:
    """Probes for e_0 .. e_L of `base`; the state holds only the probes' parameters."""
    probes = LayerProbes(base.num_layers + 1, base.cfg.width, num_subgoals)
    return TrainState.create(probes, make_optimizer(cfg), key)


def split_episodes(dataset: Any, heldout_fraction: float) -> tuple[Any, Any]:
    """(train, held-out): the last `heldout_fraction` of the episodes by index are held out."""
    num_heldout = math.ceil(dataset.num_episodes * heldout_fraction)
    if not 0 < num_heldout < dataset.num_episodes:
        raise ValueError(f"cannot hold out {heldout_fraction:.0%} of {dataset.num_episodes} episodes "
                         "and keep both parts non-empty")
    cut = dataset.num_episodes - num_heldout
    return jax.tree.map(lambda x: x[:cut], dataset), jax.tree.map(lambda x: x[cut:], dataset)


def per_layer_sums(probes: LayerProbes, residuals: jax.Array, subgoals: jax.Array, mask: jax.Array):
    """Summed cross-entropy [P] and correct predictions [P] over the valid steps, and their count."""
    logits = probes(residuals)  # [P, B, T, classes]
    mask = mask.astype(logits.dtype)
    labels = jnp.broadcast_to(jnp.maximum(subgoals, 0), logits.shape[:-1])  # padding may hold -1
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = jnp.argmax(logits, -1) == labels
    return jnp.sum(nll * mask, axis=(1, 2)), jnp.sum(correct * mask, axis=(1, 2)), jnp.sum(mask)


def by_layer(name: str, values: jax.Array) -> dict[str, jax.Array]:
    return {f"{name}/layer_{layer}": value for layer, value in enumerate(values)}


def make_train_chunk(cfg: ProbeConfig, base: Transformer, train: Any, mesh: Mesh | None = None
                     ) -> Callable[[TrainState], tuple[TrainState, dict]]:
    """A jitted `train_chunk(state) -> (state, metrics)` of `cfg.updates_per_chunk` updates on `train`:
    per-layer cross-entropy `loss/layer_l` and accuracy `accuracy/layer_l`."""
    obs, subgoals, mask = jnp.asarray(train.obs), jnp.asarray(train.subgoals), jnp.asarray(train.mask)
    optimizer = make_optimizer(cfg)

    def loss_fn(params, graphdef, residuals, subgoals, mask):
        nll_sum, correct, count = per_layer_sums(nnx.merge(graphdef, params), residuals, subgoals, mask)
        nll, accuracy = nll_sum / jnp.maximum(count, 1), correct / jnp.maximum(count, 1)
        return jnp.sum(nll), (nll, accuracy)  # the probes share no parameter: each gets its own gradient

    def update(state: TrainState, _):
        key, batch_key = jax.random.split(state.key)
        episodes = jax.random.randint(batch_key, (cfg.batch_size,), 0, obs.shape[0])
        batch_obs, batch_subgoals, batch_mask = shard_batch((obs[episodes], subgoals[episodes], mask[episodes]), mesh)
        residuals = base(batch_obs).residuals  # outside the differentiated function: the base is frozen
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, (nll, accuracy)), grads = grad_fn(state.params, state.graphdef, residuals, batch_subgoals, batch_mask)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(params=params, opt_state=opt_state, key=key), (nll, accuracy)

    @jax.jit
    def train_chunk(state: TrainState):
        state, (nll, accuracy) = jax.lax.scan(update, state, length=cfg.updates_per_chunk)
        return state, {**by_layer("loss", nll.mean(0)), **by_layer("accuracy", accuracy.mean(0))}

    return train_chunk


def episode_batches(dataset: Any, batch_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(obs, subgoals, mask) as [num_batches, batch_size, ...], padded with masked-out episodes."""
    num_batches = math.ceil(dataset.num_episodes / batch_size)
    padding = num_batches * batch_size - dataset.num_episodes

    def batched(x):
        x = np.pad(np.asarray(x), [(0, padding)] + [(0, 0)] * (np.ndim(x) - 1))
        return jnp.asarray(x.reshape(num_batches, batch_size, *x.shape[1:]))

    return batched(dataset.obs), batched(dataset.subgoals), batched(dataset.mask)


def make_evaluate(cfg: ProbeConfig, base: Transformer, heldout: Any) -> Callable[[TrainState], dict]:
    """A jitted `evaluate(state)`: per-layer `heldout_accuracy/layer_l` and `heldout_loss/layer_l` over
    every valid step of the held-out episodes (in batches, to bound memory)."""
    batches = episode_batches(heldout, cfg.batch_size)

    @jax.jit
    def evaluate(state: TrainState):
        probes = state.module()
        sums = jax.lax.map(lambda batch: per_layer_sums(probes, base(batch[0]).residuals, *batch[1:]), batches)
        nll_sum, correct, count = (jnp.sum(s, axis=0) for s in sums)
        return {**by_layer("heldout_accuracy", correct / count), **by_layer("heldout_loss", nll_sum / count)}

    return evaluate


def majority_class_accuracy(train: Any, heldout: Any, num_classes: int) -> float:
    """Held-out accuracy of always guessing the commonest training subgoal: the chance level."""
    train_labels = np.asarray(train.subgoals)[np.asarray(train.mask)]
    commonest = np.argmax(np.bincount(train_labels, minlength=num_classes))
    return float(np.mean(np.asarray(heldout.subgoals)[np.asarray(heldout.mask)] == commonest))
