"""How far a grid base model is from the best a task-blind model can do on its training labels.

Pretraining with `labels=expert` targets, at every step, the clean expert's distribution for the
episode's task, which a model that cannot see the task can predict only in expectation over the
tasks its history leaves possible. The Bayes-optimal task-blind predictor knows the task set and
how D is made (a task drawn uniformly, a layout on which it is doable, the epsilon-noisy
expert's moves) and averages the tasks' clean distributions over the posterior of the task given
the layout and the moves so far. Its cross-entropy to the labels is the floor of the pretraining
loss; a base model's excess over it is what better training could still gain, and the split by
whether the next subgoal is open (even progress: a subgoal just done, or none begun) or set (odd
progress: the pair's second colour is next) says where.

The prior leaves out that a task's layouts are redrawn at different rates (the chance that a
uniform layout is doable differs a little between tasks), so the floor is approximate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from envs import experts
from envs.grid_pinpad import GridPinpad, task_steps_needed


def step_cross_entropies(model, env: GridPinpad, epsilon: float, keys: jax.Array) -> dict[str, jax.Array]:
    """Per step [episodes, horizon] of D's expert episodes (one per key, on the pretraining tasks):
    the cross-entropy to the label of the Bayes predictor (`bayes`) and of `model` (`model`), the
    label's own entropy (`ties`: the expert's choice among equally short moves, which no predictor
    can foresee; the Bayes floor where the next colour is set), `valid` (the step happened) and
    `open` (the next subgoal is not yet set)."""
    params = env.pretrain_params()
    tasks = jnp.arange(params.tasks.size)

    def episode(key):
        key_reset, key_steps = jax.random.split(key)
        obs, state = env.reset(key_reset, params)
        # With solvable_only the drawn task's layout is doable, so the prior is uniform over the
        # doable tasks (uniform over all where layouts are not redrawn, or the redraws gave up).
        doable = jax.vmap(lambda k: task_steps_needed(state, params.tasks, k) <= env.horizon)(tasks)
        prior_allows = doable | (not env.solvable_only) | ~doable[state.task]

        def step(carry, key):
            obs, state, cache, done, log_posterior = carry
            key_action, key_env = jax.random.split(key)
            out, cache, _ = model.step(cache, obs)
            consistent, clean, moves = experts.per_task(state, params, epsilon)
            log_posterior = jnp.where(consistent, log_posterior, -jnp.inf)
            bayes = jax.nn.softmax(log_posterior) @ clean
            label = clean[state.task]
            action, _ = experts.labelled_action(key_action, state, params, epsilon)
            record = {
                "valid": ~done,
                "open": state.progress % 2 == 0,
                "bayes": -jnp.sum(label * jnp.log(jnp.maximum(bayes, 1e-12))),
                "model": -jnp.sum(label * jax.nn.log_softmax(out.action_params)),
                "ties": -jnp.sum(label * jnp.log(jnp.where(label > 0, label, 1.0))),
            }
            log_posterior = log_posterior + jnp.log(jnp.maximum(moves[:, action], 1e-30))
            obs, new_state, _, terminated, truncated, _ = env.step(key_env, state, action, params)
            state = jax.tree.map(lambda old, new: jnp.where(done, old, new), state, new_state)
            return (obs, state, cache, done | terminated | truncated, log_posterior), record

        init = (obs, state, model.init_cache(), jnp.bool_(False), jnp.where(prior_allows, 0.0, -jnp.inf))
        _, records = jax.lax.scan(step, init, jax.random.split(key_steps, env.max_steps))
        return records

    return jax.jit(jax.vmap(episode))(keys)


def summarise(records: dict[str, jax.Array]) -> dict[str, float]:
    """Mean cross-entropies over the valid steps, all of them and split by `open`."""
    summary = {}
    for name, where in (("all", records["valid"]), ("open", records["valid"] & records["open"]),
                        ("set", records["valid"] & ~records["open"])):
        steps = jnp.sum(where)
        summary[f"{name}/steps"] = int(steps)
        for predictor in ("bayes", "model", "ties"):
            summary[f"{name}/{predictor}"] = float(jnp.sum(jnp.where(where, records[predictor], 0.0)) / steps)
    return summary
