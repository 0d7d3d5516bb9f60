"""The ant's expert for the datasets: the PPO policy of the "ant_expert" stage (hrl/algos/ppo.py)
turned into an `hrl.data.expert.Expert`, `(key, state, params) -> action`, the calling convention
of the grid's shortest-path expert, so that `hrl.data.expert.collect` serves both.

The policy was trained on the privileged variant of the environment (`AntPinpadExpert-v0`: the
ant-pinpad observation followed by the per-cell direction field, spec "Expert"), but the datasets
are collected on the plain environment, whose observation is what the base model sees and what
`collect` records. Both environments share one state type, so the expert computes its privileged
observation from the plain environment's state: the base model never sees the direction field.

D samples the Gaussian (the behaviour PPO trained); D* takes its mean (spec: "the Gaussian mean
instead of a sample in the ant"). Both are clipped into [-1, 1], as in training and evaluation.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import envs
from envs.base import Env
from hrl.algos import ppo
from hrl.data.expert import Expert
from hrl.infra.config import ConfigError

# Environments whose expert is a PPO policy trained on a privileged variant (plain -> privileged).
# The grid's expert is a planner (envs/experts.py) and needs no training.
PRIVILEGED_VARIANTS = {"AntPinpad-v0": "AntPinpadExpert-v0"}


def privileged_variant(env_name: str) -> str | None:
    """The registered name of `env_name`'s privileged expert variant, or None if it has none."""
    return PRIVILEGED_VARIANTS.get(env_name)


def make_privileged_env(env_name: str, horizon: int) -> Env:
    """The environment the PPO expert trains on. Its layouts are always solvable (the variant's
    default): on an unsolvable one the direction field is zero and teaches nothing. Raises
    `ConfigError` for an environment without a privileged variant, before any work."""
    name = privileged_variant(env_name)
    if name is None:
        raise ConfigError(
            f"env.name: {env_name!r} has no privileged expert variant to train a PPO expert on (the grid's "
            f"expert is the shortest-path planner of envs/experts.py and needs no training); "
            f"environments with one: {sorted(PRIVILEGED_VARIANTS)}, got {env_name!r}")
    return envs.make(name, horizon=horizon)


def policy_expert(state: ppo.PPOState, privileged_env: Env, sample: bool, normalize_observations: bool = True) -> Expert:
    """The trained policy as `(key, plain env state, params) -> action` in [-1, 1]: a Gaussian
    sample (`sample`, for D) or the Gaussian mean (for D*, where the key is unused). Only the actor
    runs: the critic is not needed to act."""
    network = nnx.merge(state.graphdef, state.params)
    obs_stats = state.obs_stats

    def act(key: jax.Array, env_state: Any, params: Any) -> jax.Array:
        obs = ppo.normalize(obs_stats, privileged_env.observe(env_state, params), normalize_observations)
        action = network.actor(obs)  # the Gaussian mean
        if sample:
            action = action + jnp.exp(network.log_std[...]) * jax.random.normal(key, action.shape)
        return jnp.clip(action, -1.0, 1.0)

    return act
