"""How a switching gate beta_t segments episodes, against the ground-truth subgoals.

All functions take batches of padded episodes, time on the last axis: beta [..., T], subgoals
[..., T] (the subgoal when action t was chosen) and mask [..., T] (the steps that happened). They
are jnp functions, so evaluation computes them inside jit.

- A switch event is a valid step with beta_t >= threshold (paper: 0.5).
- A ground-truth boundary is a valid step t >= 1 whose subgoal differs from step t-1's: the first
  step of a new subgoal.
- Precision: the share of switch events at t >= 1 with a boundary within `tolerance` steps;
  recall: the share of boundaries with a switch event within `tolerance` steps. The switch at
  t = 0 is left out of both, since every episode starts a subgoal there and z_0 = 0 forces the
  gate to pick a first z; it still counts in `switches_per_episode`.
- Quasi-binarity: the share of valid beta values strictly between 0.1 and 0.9 (low is binary).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def subgoal_boundaries(subgoals: jax.Array, mask: jax.Array) -> jax.Array:
    """bool [..., T]: the first step of every subgoal after the first."""
    changed = subgoals[..., 1:] != subgoals[..., :-1]
    return jnp.concatenate([jnp.zeros_like(changed[..., :1]), changed & mask[..., 1:]], axis=-1)


def near(events: jax.Array, targets: jax.Array, tolerance: int) -> jax.Array:
    """bool [..., T]: the events with a target within `tolerance` steps."""
    padded = jnp.pad(targets, [(0, 0)] * (targets.ndim - 1) + [(tolerance, tolerance)])
    length = targets.shape[-1]
    window = jnp.any(jnp.stack([padded[..., i:i + length] for i in range(2 * tolerance + 1)]), axis=0)
    return events & window


def switching_statistics(beta: jax.Array, subgoals: jax.Array, mask: jax.Array, threshold: float = 0.5,
                         tolerance: int = 1) -> dict[str, jax.Array]:
    """Scalars over all episodes: precision, recall, f1, switches_per_episode, intermediate_beta_share
    (values of beta in (0.1, 0.9)) and mean_beta."""
    mask = mask.astype(bool)
    switches = (beta >= threshold) & mask
    later_switches = switches.at[..., 0].set(False)
    boundaries = subgoal_boundaries(subgoals, mask)
    precision = jnp.sum(near(later_switches, boundaries, tolerance)) / jnp.maximum(jnp.sum(later_switches), 1)
    recall = jnp.sum(near(boundaries, later_switches, tolerance)) / jnp.maximum(jnp.sum(boundaries), 1)
    f1 = 2 * precision * recall / jnp.maximum(precision + recall, 1e-9)
    episodes = jnp.maximum(jnp.sum(jnp.any(mask, axis=-1)), 1)
    valid = jnp.maximum(jnp.sum(mask), 1)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "switches_per_episode": jnp.sum(switches) / episodes,
        "boundaries_per_episode": jnp.sum(boundaries) / episodes,
        "intermediate_beta_share": jnp.sum(mask & (beta > 0.1) & (beta < 0.9)) / valid,
        "mean_beta": jnp.sum(jnp.where(mask, beta, 0.0)) / valid,
    }
