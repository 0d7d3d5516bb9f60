"""Raw-action RL ("GRPO"): internal RL's update applied to the base model's own actions.

The pretrained base model is fine-tuned as the policy, without a metacontroller: episodes are
rolled out with its cached incremental decoder, sampling raw actions; every raw action of an
episode gets the episode's return z-scored over its group (std + 1e-3); PPO's clipped surrogate
over the raw actions, no critic. This is the baseline the paper shows failing on the sparse
post-training task: success must be found by token-level exploration first.

Options (`GRPOConfig`):
- `group_size` 0 (default, the paper's variant: one task with random layouts, so the group is the
  whole batch) or G: batch_size / G layouts, each rolled out G times, z-scored within its group
  (GRPO proper);
- `kl_coef` > 0: adds coef * KL(pi || pi_ref) per step, exact for the categorical head, against
  the pretrained model (off in the paper's variant).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from envs.base import Env
from hrl.infra.config import check
from hrl.infra.mesh import Mesh, shard_batch
from hrl.infra.objectives import clipped_surrogate, epochs_of_minibatches, masked_mean, on_policy_chunk, zscore
from hrl.infra.train_state import TrainState
from hrl.models import rollout as base_rollout
from hrl.models.transformer import ResidualStreamModel


@dataclasses.dataclass
class GRPOConfig:
    """The paper's raw-action baseline uses internal RL's algorithm and settings (batch 1024, lr 3e-5)."""

    learning_rate: float = 3e-5
    max_grad_norm: float = 1.0
    batch_size: int = 1024  # episodes per update
    group_size: int = 0  # 0: the whole batch is one group (paper); G: G rollouts per layout
    kl_coef: float = 0.0  # KL to the pretrained model (paper: none)
    epochs: int = 1
    minibatches: int = 1
    clip_epsilon: float = 0.2
    num_updates: int = 1000
    updates_per_chunk: int = 10
    eval_episodes: int = 256

    def validate(self) -> None:
        for name in ("learning_rate", "max_grad_norm", "batch_size", "epochs", "minibatches", "clip_epsilon",
                     "num_updates", "updates_per_chunk", "eval_episodes"):
            check(getattr(self, name) > 0, name, "must be > 0", getattr(self, name))
        check(self.kl_coef >= 0, "kl_coef", "must be >= 0", self.kl_coef)
        check(self.group_size >= 0 and (self.group_size == 0 or self.batch_size % self.group_size == 0),
              "group_size", f"must be 0 or divide batch_size ({self.batch_size})", self.group_size)
        check(self.batch_size % self.minibatches == 0, "minibatches",
              f"must divide batch_size ({self.batch_size})", self.minibatches)
        check(self.num_updates % self.updates_per_chunk == 0, "num_updates",
              f"must be a multiple of updates_per_chunk ({self.updates_per_chunk})", self.num_updates)

    @property
    def num_chunks(self) -> int:
        return self.num_updates // self.updates_per_chunk

    @property
    def num_groups(self) -> int:
        return 1 if self.group_size == 0 else self.batch_size // self.group_size


class Episode(NamedTuple):
    obs: jax.Array  # [T, obs_dim]
    actions: jax.Array  # [T]
    log_prob: jax.Array  # [T] under the policy that acted
    mask: jax.Array  # [T] the steps that happened
    success: jax.Array
    progress: jax.Array
    episode_return: jax.Array


def rollout(model: ResidualStreamModel, env: Env, env_params: Any, reset_key: jax.Array, action_key: jax.Array) -> Episode:
    """One episode of `model` sampling raw actions; the layout comes from `reset_key` alone, so a
    GRPO group shares it."""
    obs, state = env.reset(reset_key, env_params)

    def step(carry, key):
        obs, state, cache, done, success, progress, total = carry
        act_key, env_key = jax.random.split(key)
        out, cache, _ = model.step(cache, obs)
        action = model.action_dist.sample(out.action_params, act_key)
        log_prob = model.action_dist.log_prob(out.action_params, action)
        next_obs, new_state, reward, terminated, truncated, info = env.step(env_key, state, action, env_params)
        # Results freeze when the episode ends; the steps after it are discarded.
        state = jax.tree.map(lambda old, new: jnp.where(done, old, new), state, new_state)
        success = success | (~done & info["success"])
        progress = jnp.where(done, progress, info["progress"])
        total = total + jnp.where(done, 0.0, reward)
        record = (obs, action, log_prob, ~done)
        return (next_obs, state, cache, done | terminated | truncated, success, progress, total), record

    start = (obs, state, model.init_cache(), jnp.bool_(False), jnp.bool_(False), jnp.int32(0), jnp.float32(0.0))
    (*_, success, progress, total), (obs, actions, log_prob, mask) = jax.lax.scan(
        step, start, jax.random.split(action_key, env.max_steps))
    return Episode(obs, actions, log_prob, mask, success, progress, total)


def make_optimizer(cfg: GRPOConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(cfg.learning_rate))


def init(key: jax.Array, cfg: GRPOConfig, base: ResidualStreamModel) -> TrainState:
    """The policy starts as the pretrained base model (its parameters are copied into the state)."""
    return TrainState.create(base, make_optimizer(cfg), key)


def policy_loss(cfg: GRPOConfig, graphdef, reference: ResidualStreamModel, params: Any, batch: tuple[Episode, jax.Array]
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Minus the clipped surrogate over a minibatch's raw actions (plus the KL term if on)."""
    episodes, advantages = batch
    policy = nnx.merge(graphdef, params)
    logits = policy(episodes.obs).action_params
    log_prob = policy.action_dist.log_prob(logits, episodes.actions)
    objective, stats = clipped_surrogate(log_prob, episodes.log_prob, advantages[:, None], episodes.mask,
                                         cfg.clip_epsilon)
    loss = -objective
    if cfg.kl_coef:
        kl = policy.action_dist.kl(logits, jax.lax.stop_gradient(reference(episodes.obs).action_params))
        stats["kl_to_reference"] = masked_mean(kl, episodes.mask)
        loss = loss + cfg.kl_coef * stats["kl_to_reference"]
    return loss, stats


def make_train_chunk(cfg: GRPOConfig, base: ResidualStreamModel, env: Env, env_params: Any, mesh: Mesh | None = None
                     ) -> Callable[[TrainState], tuple[TrainState, dict]]:
    """A jitted `train_chunk(state)`: per update a batch of episodes of the current model, then the
    clipped updates. Metrics as internal RL's (`episodes`: training episodes so far). With a
    `mesh`, the rollouts and each minibatch are split over its devices."""
    optimizer = make_optimizer(cfg)

    def update(state: TrainState, _):
        key, reset_key, action_key, update_key = jax.random.split(state.key, 4)
        # Each group's episodes share one layout: its reset key.
        reset_keys = jnp.repeat(jax.random.split(reset_key, cfg.num_groups), cfg.batch_size // cfg.num_groups, axis=0)
        reset_keys, action_keys = shard_batch((reset_keys, jax.random.split(action_key, cfg.batch_size)), mesh)
        model = state.module()
        episodes = shard_batch(jax.vmap(lambda r, a: rollout(model, env, env_params, r, a))(reset_keys, action_keys), mesh)
        advantages = zscore(episodes.episode_return, cfg.num_groups)
        loss = lambda params, batch: policy_loss(cfg, state.graphdef, base, params, shard_batch(batch, mesh))  # noqa: E731
        params, opt_state, stats = epochs_of_minibatches(loss, optimizer, state.params, state.opt_state,
                                                         (episodes, advantages), update_key, cfg.epochs, cfg.minibatches)
        metrics = {"success_rate": episodes.success.mean(), "return": episodes.episode_return.mean(),
                   "episode_length": episodes.mask.sum(-1).mean(), "progress": episodes.progress.mean(), **stats}
        return state.replace(params=params, opt_state=opt_state, key=key), metrics

    return on_policy_chunk(update, cfg.updates_per_chunk, cfg.batch_size, cfg.epochs * cfg.minibatches)


def make_evaluate(cfg: GRPOConfig, env: Env, env_params: Any, key: jax.Array) -> Callable[[TrainState], dict]:
    """A jitted `evaluate(state)`: the fine-tuned model's success on `eval_episodes` fixed layouts."""
    keys = jax.random.split(key, cfg.eval_episodes)

    @jax.jit
    def evaluate(state: TrainState):
        return base_rollout.evaluate(state.module(), env, env_params, keys)

    return evaluate
