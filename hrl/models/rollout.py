"""Closed-loop episodes of a sequence policy, decoded incrementally (one token per step).

The policy is any model with `init_cache(batch_shape)`, `step(cache, obs, intervention, layer)`
returning (Output, cache, e_layer) and `action_dist` (`hrl.models.heads`): the transformer or the
Hawk model, on discrete or continuous actions. Recomputing the prefix at every step is never
done: each environment step costs one cached model step.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from envs.base import Env


# How evaluations decode actions, and the prefix of their metrics: sampled (the policy as RL and
# the controllers use it) and the most likely action.
DECODINGS = (("", False), ("greedy_", True))


def choose_action(action_dist: Any, action_params: jax.Array, key: jax.Array, greedy: bool) -> jax.Array:
    """The most likely action if greedy, else one sampled."""
    return action_dist.mode(action_params) if greedy else action_dist.sample(action_params, key)


class Episode(NamedTuple):
    success: jax.Array  # bool
    progress: jax.Array  # colours correctly visited when the episode ended
    length: jax.Array  # steps taken
    watched: Any = None  # per step, what `run_episode`'s `watch` recorded (None without one)


# steer(e_layer, subgoal) -> the steered e_layer: the controller of the ground-truth subgoal.
Steer = Callable[[jax.Array, jax.Array], jax.Array]


def run_episode(
    model: Any, env: Env, env_params: Any, key: jax.Array, *, greedy: bool = False,
    watch: Callable[[Any, jax.Array, Any], Any] | None = None, steer: Steer | None = None, layer: int | None = None,
) -> Episode:
    """One episode of the model, sampling its actions (the most likely one if greedy).

    `watch(state, action, next_state)`, if given, is recorded at every step of the scan: the steps
    from `length` on come after the episode's end, and what they record means nothing.
    With `steer`, each step's residual at `layer` becomes `steer(e_layer, env.subgoal(state))`:
    the controller switches right after the step that completes a subgoal. The keys are used alike
    either way, so zero controllers give the unsteered model's episode."""
    key_reset, key_steps = jax.random.split(key)
    obs, state = env.reset(key_reset, env_params)

    def step(carry, key):
        obs, state, cache, done, success, progress, length = carry
        key_act, key_env = jax.random.split(key)
        intervention = None if steer is None else (lambda e: steer(e, env.subgoal(state, env_params)))
        out, cache, _ = model.step(cache, obs, intervention, layer)
        action = choose_action(model.action_dist, out.action_params, key_act, greedy)
        obs, new_state, _, terminated, truncated, info = env.step(key_env, state, action, env_params)
        watched = None if watch is None else watch(state, action, new_state)
        # Freeze the episode's results once it has ended; later steps are discarded.
        state = jax.tree.map(lambda old, new: jnp.where(done, old, new), state, new_state)
        success = success | (~done & info["success"])
        progress = jnp.where(done, progress, info["progress"])
        length = length + (~done).astype(jnp.int32)
        return (obs, state, cache, done | terminated | truncated, success, progress, length), watched

    init = (obs, state, model.init_cache(), jnp.bool_(False), jnp.bool_(False), jnp.int32(0), jnp.int32(0))
    (*_, success, progress, length), watched = jax.lax.scan(step, init, jax.random.split(key_steps, env.max_steps))
    return Episode(success, progress, length, watched)


def evaluate(model: Any, env: Env, env_params: Any, keys: jax.Array, greedy: bool = False) -> dict[str, jax.Array]:
    """Success rate, mean progress and mean length over one episode per key (vmapped)."""
    episodes = jax.vmap(lambda k: run_episode(model, env, env_params, k, greedy=greedy))(keys)
    return {
        "success_rate": jnp.mean(episodes.success),
        "progress": jnp.mean(episodes.progress),
        "length": jnp.mean(episodes.length),
    }
