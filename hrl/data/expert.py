"""Expert datasets: D (optionally noisy) and D* (clean) on the pretraining tasks.

Episodes are generated inside jit: a batch of episodes is one `vmap` over episodes of a `lax.scan`
over the horizon, with the expert choosing each action. A dataset is reproducible from its key:
batch b uses `fold_in(key, b)`.

Per episode, arrays are padded to the horizon T; `mask[t]` marks the steps that happened.
`subgoals[t]` is the ground-truth subgoal when action t was chosen (for analysis only; never a
model input, like `task_ids`).

`rollout_streams` generates the other layout, for online pretraining: episodes back to back in
rows of fixed length with no padding, each step tagged with its episode's segment id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from envs.base import Env
from envs.wrappers import VmapAutoReset

Expert = Callable[[jax.Array, object, object], jax.Array]  # (key, state, params) -> action
LabelledExpert = Callable[[jax.Array, object, object], tuple[jax.Array, Any]]  # -> (action, label)

FORMAT_VERSION = 1


@struct.dataclass
class Dataset:
    obs: jax.Array  # [N, T, obs_dim]
    actions: jax.Array  # [N, T]
    mask: jax.Array  # [N, T] bool, the steps that happened
    subgoals: jax.Array  # [N, T] int32, ground-truth subgoal at each step (analysis only)
    task_ids: jax.Array  # [N] int32 (analysis only)
    lengths: jax.Array  # [N] int32
    success: jax.Array  # [N] bool

    @property
    def num_episodes(self) -> int:
        return self.actions.shape[0]

    @property
    def horizon(self) -> int:
        return self.actions.shape[1]


@dataclass
class CollectConfig:
    """Sizes of the expert datasets. The paper gives none (spec: DECIDE)."""

    num_episodes: int = 2048  # episodes in D
    num_episodes_clean: int = 2048  # episodes in D* (the metacontroller's data)
    # D's noise: probability of a random move that avoids wrong colours. D* always uses 0. DECIDE:
    # 0.1 keeps D near-optimal while showing the base model some off-path states to recover from.
    epsilon: float = 0.1
    episodes_per_batch: int = 1024  # episodes generated per jitted call (bounds memory)

    def validate(self) -> None:
        for name in ("num_episodes", "num_episodes_clean", "episodes_per_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon: must be in [0, 1], got {self.epsilon}")


def rollout_expert(env: Env, params, expert: Expert, key: jax.Array) -> Dataset:
    """One expert episode (unbatched; vmap it). Steps after the episode's end are masked out."""
    return rollout_expert_labelled(env, params, expert, lambda state, params: None, key)[0]


def rollout_expert_labelled(env: Env, params, expert: Expert, label: Callable[[Any, Any], Any], key: jax.Array
                            ) -> tuple[Dataset, Any]:
    """`rollout_expert`'s episode and `label(state, params)` at each of its steps (time first;
    after the end, the final state's)."""
    key_reset, key_steps = jax.random.split(key)
    obs, state = env.reset(key_reset, params)

    def step(carry, key):
        obs, state, done, success = carry
        key_act, key_env = jax.random.split(key)
        action = expert(key_act, state, params)
        record = (obs, action, ~done, env.subgoal(state, params), label(state, params))
        next_obs, next_state, _, terminated, truncated, info = env.step(key_env, state, action, params)
        # After the end, keep the final state (env.step never resets).
        next_state = jax.tree.map(lambda old, new: jnp.where(done, old, new), state, next_state)
        success = success | (~done & info["success"])
        return (next_obs, next_state, done | terminated | truncated, success), record

    init = (obs, state, jnp.bool_(False), jnp.bool_(False))
    (_, state, _, success), (obs, actions, mask, subgoals, labels) = jax.lax.scan(
        step, init, jax.random.split(key_steps, env.max_steps)
    )
    task_id = params.tasks.ids[state.task]
    return Dataset(obs, actions, mask, subgoals, task_id, jnp.sum(mask, dtype=jnp.int32), success), labels


class Stream(NamedTuple):
    """Consecutive steps of an expert that starts a new episode as soon as one ends."""

    obs: jax.Array  # [B, T, obs_dim]
    actions: jax.Array  # [B, T]
    labels: Any  # the expert's label at every step, [B, T, ...]
    segments: jax.Array  # [B, T] int32: which episode of the stream each step belongs to (0, 1, ...)


def rollout_streams(env: Env, params, expert: LabelledExpert, key: jax.Array, num_streams: int, length: int) -> Stream:
    """`num_streams` streams (batched) of expert episodes back to back for `length` steps: sequences
    with no padding, for training on several episodes packed into one sequence. The last episode
    of a stream is cut at `length`. Resets happen only where an episode ended (`VmapAutoReset`)."""
    stepper = VmapAutoReset(env, num_streams)
    key_reset, key_steps = jax.random.split(key)
    obs, state = stepper.reset(jax.random.split(key_reset, num_streams), params)

    def step(carry, key):
        obs, state, segment = carry
        act_keys, env_keys = jnp.split(jax.random.split(key, 2 * num_streams), 2)
        action, label = jax.vmap(expert, (0, 0, None))(act_keys, state, params)
        record = (obs, action, label, segment)
        obs, state, _, terminated, truncated, _ = stepper.step(env_keys, state, action, params)
        return (obs, state, segment + (terminated | truncated)), record

    init = (obs, state, jnp.zeros(num_streams, jnp.int32))
    _, records = jax.lax.scan(step, init, jax.random.split(key_steps, length))
    return Stream(*jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), records))  # time second


@partial(jax.jit, static_argnums=(0, 2))
def _rollout_batch(env: Env, params, expert: Expert, keys: jax.Array) -> Dataset:
    return jax.vmap(lambda key: rollout_expert(env, params, expert, key))(keys)


def collect(env: Env, params, expert: Expert, key: jax.Array, num_episodes: int, episodes_per_batch: int) -> Dataset:
    """`num_episodes` expert episodes as host (numpy) arrays, generated in jitted batches."""
    parts = []
    for b in range(math.ceil(num_episodes / episodes_per_batch)):
        keys = jax.random.split(jax.random.fold_in(key, b), episodes_per_batch)
        parts.append(jax.tree.map(np.asarray, _rollout_batch(env, params, expert, keys)))
    return jax.tree.map(lambda *xs: np.concatenate(xs)[:num_episodes], *parts)


def save_dataset(dataset: Dataset, path: str | Path) -> None:
    """Compressed .npz (padding and one-hot observations compress well)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    fields = {name: np.asarray(getattr(dataset, name)) for name in Dataset.__dataclass_fields__}
    np.savez_compressed(tmp, format_version=FORMAT_VERSION, **fields)
    tmp.replace(path)  # never leave a half-written dataset under the real name


def load_dataset(path: str | Path) -> Dataset:
    with np.load(Path(path)) as data:
        if int(data["format_version"]) != FORMAT_VERSION:
            raise ValueError(f"{path}: dataset format {int(data['format_version'])}, expected {FORMAT_VERSION}")
        return Dataset(**{name: data[name] for name in Dataset.__dataclass_fields__})
