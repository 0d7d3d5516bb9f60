"""Loss pieces several algorithms share: masked means, and the critic-free policy-gradient update
of internal RL and GRPO (batch z-scored returns, PPO's clipped surrogate, epochs of minibatches).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

# The paper's floor under the batch's standard deviation: with all-equal returns (every episode
# failed, as at the start of a sparse task) the advantages are 0, not 0 / 0.
RETURN_STD_FLOOR = 1e-3


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """The mean of `values` where `mask` is true (0 when it is nowhere true)."""
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1)


def zscore(returns: jax.Array, groups: int = 1) -> jax.Array:
    """Advantages (R - mean) / (std + 1e-3) within each of `groups` equal consecutive slices of
    the batch: one group is the paper's whole-batch baseline, G rollouts per group are GRPO's."""
    grouped = returns.reshape(groups, -1)
    mean = grouped.mean(axis=1, keepdims=True)
    std = grouped.std(axis=1, keepdims=True)
    return ((grouped - mean) / (std + RETURN_STD_FLOOR)).reshape(returns.shape)


def clipped_surrogate(log_prob: jax.Array, old_log_prob: jax.Array, advantage: jax.Array, mask: jax.Array,
                      clip_epsilon: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's objective to maximise, mean over the valid decisions: min(r A, clip(r, 1 - eps, 1 + eps) A)
    with r = pi / pi_old. Also returns the share of clipped decisions and an estimate of
    KL(pi_old || pi), for monitoring."""
    ratio = jnp.exp(log_prob - old_log_prob)
    objective = jnp.minimum(ratio * advantage, jnp.clip(ratio, 1 - clip_epsilon, 1 + clip_epsilon) * advantage)
    stats = {"clip_fraction": masked_mean(jnp.abs(ratio - 1) > clip_epsilon, mask),
             "approx_kl": masked_mean((ratio - 1) - (log_prob - old_log_prob), mask)}
    return masked_mean(objective, mask), stats


Loss = Callable[[Any, Any], tuple[jax.Array, dict[str, jax.Array]]]  # (params, minibatch) -> (loss, stats)


def epochs_of_minibatches(loss_fn: Loss, optimizer: optax.GradientTransformation, params: Any, opt_state: Any,
                          batch: Any, key: jax.Array, epochs: int, minibatches: int
                          ) -> tuple[Any, Any, dict[str, jax.Array]]:
    """`epochs` passes over `batch` (a pytree with the episode axis first), each in `minibatches`
    random slices of episodes, one gradient step per slice. Returns the new parameters and
    optimiser state, and the loss and stats averaged over all steps."""
    size = jax.tree.leaves(batch)[0].shape[0]

    def epoch(carry, key):
        order = jax.random.permutation(key, size).reshape(minibatches, -1)
        return jax.lax.scan(step, carry, order)

    def step(carry, indices):
        params, opt_state = carry
        minibatch = jax.tree.map(lambda x: x[indices], batch)
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, minibatch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), {"loss": loss, **stats}

    (params, opt_state), stats = jax.lax.scan(epoch, (params, opt_state), jax.random.split(key, epochs))
    return params, opt_state, jax.tree.map(jnp.mean, stats)


def on_policy_chunk(update: Callable, updates_per_chunk: int, batch_size: int, steps_per_update: int) -> Callable:
    """The jitted `train_chunk(state)` of an on-policy algorithm: `update(state, _) -> (state,
    metrics)` `updates_per_chunk` times in `lax.scan`, metrics averaged over them, and `episodes`,
    the training episodes so far (the optimiser's step count over its `steps_per_update` gradient
    steps per update, times `batch_size` episodes per update)."""

    @jax.jit
    def train_chunk(state):
        state, metrics = jax.lax.scan(update, state, length=updates_per_chunk)
        metrics = jax.tree.map(jnp.mean, metrics)
        steps_done = optax.tree_utils.tree_get(state.opt_state, "count")
        metrics["episodes"] = steps_done // steps_per_update * batch_size
        return state, metrics

    return train_chunk
