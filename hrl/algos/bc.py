"""Behaviour cloning: an MLP policy fit to the expert's actions, one observation at a time.

The smallest real algorithm on the shared infrastructure, in the purejaxrl style: every
hyperparameter in `BCConfig`, a pure `init`, and one jitted `train_chunk(state)` that runs
`updates_per_chunk` AdamW updates in `lax.scan`, drawing minibatches from the on-device
dataset with the key carried in the state (so a resumed run repeats the same batches).

The policy sees only the current observation. Pinpad tasks are hidden and the observation
does not show which colours were visited, so a memoryless policy cannot tell every expert
decision apart: accuracy and closed-loop success stay well below 1 by design. This is a
baseline and a test bed for the training loop, not the paper's sequence model.

The train state is the shared `hrl.infra.train_state.TrainState` (parameters as a plain pytree,
everything under plain `jax.jit`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hrl.infra.config import check
from hrl.infra.mesh import Mesh, shard_batch
from hrl.infra.train_state import TrainState, adamw


@dataclasses.dataclass
class BCConfig:
    hidden_sizes: tuple[int, ...] = (256, 256)
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    batch_size: int = 256
    num_updates: int = 2_000
    updates_per_chunk: int = 100  # one host round trip (metrics, progress) per chunk
    eval_episodes: int = 128  # closed-loop episodes per evaluation, on fixed layouts
    eval_task: int = 0  # the pretraining task (index in the env's table) evaluated closed-loop

    def validate(self) -> None:
        for name in ("learning_rate", "max_grad_norm", "batch_size", "num_updates", "updates_per_chunk", "eval_episodes"):
            check(getattr(self, name) > 0, name, "must be > 0", getattr(self, name))
        check(self.eval_task >= 0, "eval_task", "must be >= 0", self.eval_task)
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        check(len(self.hidden_sizes) > 0 and min(self.hidden_sizes) >= 1, "hidden_sizes",
              "must be one or more sizes >= 1", self.hidden_sizes)
        check(self.num_updates % self.updates_per_chunk == 0, "num_updates",
              f"must be a multiple of updates_per_chunk ({self.updates_per_chunk})", self.num_updates)

    @property
    def num_chunks(self) -> int:
        return self.num_updates // self.updates_per_chunk


class MLPPolicy(nnx.Module):
    """Binary observation -> action logits."""

    def __init__(self, obs_dim: int, hidden_sizes: tuple[int, ...], num_actions: int, rngs: nnx.Rngs):
        sizes = (obs_dim, *hidden_sizes)
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.head = nnx.Linear(sizes[-1], num_actions, rngs=rngs)

    def __call__(self, obs: jax.Array) -> jax.Array:
        x = obs.astype(jnp.float32)
        for layer in self.hidden:
            x = jax.nn.relu(layer(x))
        return self.head(x)


def make_optimizer(cfg: BCConfig) -> optax.GradientTransformation:
    return adamw(cfg.learning_rate, cfg.weight_decay, cfg.max_grad_norm)


def init(key: jax.Array, cfg: BCConfig, obs_dim: int, num_actions: int) -> TrainState:
    model_key, train_key = jax.random.split(key)
    model = MLPPolicy(obs_dim, tuple(cfg.hidden_sizes), num_actions, nnx.Rngs(params=model_key))
    return TrainState.create(model, make_optimizer(cfg), train_key)


def valid_steps(dataset: Any) -> tuple[jax.Array, jax.Array]:
    """(observations [M, obs_dim], expert actions [M]) of every valid step, on the device."""
    mask = np.asarray(dataset.mask)
    return jnp.asarray(np.asarray(dataset.obs)[mask]), jnp.asarray(np.asarray(dataset.actions)[mask])


def make_train_chunk(cfg: BCConfig, dataset: Any, mesh: Mesh | None = None
                     ) -> Callable[[TrainState], tuple[TrainState, dict[str, jax.Array]]]:
    """A jitted `train_chunk(state) -> (state, {"loss", "accuracy"})`: `cfg.updates_per_chunk` updates.
    With a `mesh`, each minibatch is split over its devices (the dataset is on every device)."""
    observations, expert_actions = valid_steps(dataset)
    optimizer = make_optimizer(cfg)

    def loss_fn(params, graphdef, obs, actions):
        logits = nnx.merge(graphdef, params)(obs)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, actions).mean()
        return loss, jnp.mean(jnp.argmax(logits, axis=-1) == actions)

    def update(state: TrainState, _):
        key, batch_key = jax.random.split(state.key)
        batch = jax.random.randint(batch_key, (cfg.batch_size,), 0, observations.shape[0])
        obs, actions = shard_batch((observations[batch], expert_actions[batch]), mesh)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, accuracy), grads = grad_fn(state.params, state.graphdef, obs, actions)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(params=params, opt_state=opt_state, key=key), (loss, accuracy)

    @jax.jit
    def train_chunk(state: TrainState):
        state, (loss, accuracy) = jax.lax.scan(update, state, length=cfg.updates_per_chunk)
        return state, {"loss": loss.mean(), "accuracy": accuracy.mean()}

    return train_chunk


def make_evaluate(cfg: BCConfig, env: Any, env_params: Any, key: jax.Array) -> Callable[[TrainState], dict[str, jax.Array]]:
    """A jitted `evaluate(state)`: greedy closed-loop episodes, all in one vmapped scan.

    The episode keys are fixed by `key`, so every evaluation of a run sees the same layouts
    and curves are comparable. Returns the success rate and the mean task progress (colours
    correctly visited).
    """
    episode_keys = jax.random.split(key, cfg.eval_episodes)

    def run_episode(policy: MLPPolicy, episode_key: jax.Array):
        reset_key, step_key = jax.random.split(episode_key)
        obs, env_state = env.reset(reset_key, env_params)

        def step(carry, step_key):
            obs, env_state, done, success, progress = carry
            action = jnp.argmax(policy(obs))
            obs, env_state, _, terminated, truncated, info = env.step(step_key, env_state, action, env_params)
            # Results freeze when the episode ends; the steps after it are discarded.
            success = success | (info["success"] & ~done)
            progress = jnp.where(done, progress, info["progress"])
            return (obs, env_state, done | terminated | truncated, success, progress), None

        start = (obs, env_state, jnp.bool_(False), jnp.bool_(False), jnp.int32(0))
        (_, _, _, success, progress), _ = jax.lax.scan(step, start, jax.random.split(step_key, env.max_steps))
        return success, progress

    @jax.jit
    def evaluate(state: TrainState):
        policy = state.module()
        success, progress = jax.vmap(lambda k: run_episode(policy, k))(episode_keys)
        return {"success_rate": success.mean(), "progress": progress.mean()}

    return evaluate
