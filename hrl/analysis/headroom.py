"""How far a grid base model is from the best a task-blind model can do on its training labels.

Pretraining with `labels=expert` targets, at every step, the clean expert's distribution for the
episode's task, which a model that cannot see the task can predict only in expectation over the
tasks its history leaves possible. The Bayes-optimal task-blind predictor knows the task set and
how D is made (a task drawn uniformly, a layout on which it is doable, the epsilon-noisy
expert's moves) and averages the tasks' clean distributions over the posterior of the task given
the layout and the moves so far. Its cross-entropy to the labels is the floor of the pretraining
loss; a base model's excess over it is what better training could still gain, and the split by
whether the next subgoal is open (even progress: a subgoal just done, or none begun) or set (odd
progress: the pair's second colour is next) says where. Closed loop, the Bayes predictor is a
policy too: sampling its distribution and feeding its own moves back as evidence, it is what a
perfectly trained task-blind base model would do, and its "any pretraining task" success is the
ceiling of the base model's (`closed_loop_success`). `closed_loop_failures` says how the
model's episodes fail: mostly, right after a subgoal X, by stepping onto a colour of a subgoal
that no pretraining task has after X (re-run seed 0, 512 episodes: A->B 55, C->D 31 of 170
failures, 43 out of time).

The prior leaves out that a task's layouts are redrawn at different rates (the chance that a
uniform layout is doable differs a little between tasks), so the floor is approximate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from envs import experts, pinpad
from envs.grid_pinpad import GridPinpad
from hrl.algos.pretrain import posterior_targets, task_evidence, task_mixture, task_prior
from hrl.data.expert import rollout_streams
from hrl.models import rollout


def step_cross_entropies(model, env: GridPinpad, epsilon: float, key: jax.Array, sequences: int) -> dict[str, jax.Array]:
    """Per step [sequences, horizon] of D's expert episodes, packed back to back as in
    pretraining (`rollout_streams`): the cross-entropy to the label of the Bayes predictor
    (`bayes`, which is `hrl.algos.pretrain.posterior_targets`) and of `model` (`model`), the
    label's own entropy (`ties`: the expert's choice among equally short moves, which no
    predictor can foresee; the Bayes floor where the next colour is set) and `open` (the next
    subgoal is not yet set)."""
    params = env.pretrain_params()

    def expert(key, state, params):
        action, label = experts.labelled_action(key, state, params, epsilon)
        return action, (label, experts.per_task(state, params, epsilon, env.horizon), state.progress % 2 == 0)

    @jax.jit
    def measure(key):
        streams = rollout_streams(env, params, expert, key, sequences, env.max_steps)
        label, view, is_open = streams.labels
        bayes = posterior_targets(streams._replace(labels=view), env.solvable_only)
        logits = model(streams.obs, segments=streams.segments).action_params

        def cross_entropy(log_probabilities):
            return -jnp.sum(label * jnp.where(label > 0, log_probabilities, 0.0), axis=-1)

        return {"open": is_open, "bayes": cross_entropy(jnp.log(bayes)), "model": cross_entropy(jax.nn.log_softmax(logits)),
                "ties": cross_entropy(jnp.log(jnp.where(label > 0, label, 1.0)))}

    return measure(key)


def summarise(records: dict[str, jax.Array]) -> dict[str, float]:
    """Mean cross-entropies over the steps, all of them and split by `open`."""
    summary = {}
    for name, where in (("all", jnp.ones_like(records["open"])), ("open", records["open"]), ("set", ~records["open"])):
        steps = jnp.sum(where)
        summary[f"{name}/steps"] = int(steps)
        for predictor in ("bayes", "model", "ties"):
            summary[f"{name}/{predictor}"] = float(jnp.sum(jnp.where(where, records[predictor], 0.0)) / steps)
    return summary


def bayes_policy_episode(env: GridPinpad, params, epsilon: float, key: jax.Array) -> rollout.Episode:
    """One "any task" episode of the Bayes-optimal task-blind policy: at every step it samples the
    posterior-averaged clean expert distribution (the pretraining floor's predictor), then weighs
    the tasks by how likely D's noisy expert would have made its move. The keys are used as in
    `rollout.run_episode`, so a key gives the same layout to both."""
    key_reset, key_steps = jax.random.split(key)
    _, state = env.reset(key_reset, params)
    log_posterior = task_prior(experts.per_task(state, params, epsilon, env.horizon), env.solvable_only)

    def step(carry, key):
        state, log_posterior, done, success, progress, length = carry
        key_act, key_env = jax.random.split(key)
        view = experts.per_task(state, params, epsilon, env.horizon)
        possible, distribution = task_mixture(log_posterior, view.consistent, view.clean)
        action = jax.random.categorical(key_act, jnp.log(distribution))
        _, new_state, _, terminated, truncated, info = env.step(key_env, state, action, params)
        state = jax.tree.map(lambda old, new: jnp.where(done, old, new), state, new_state)
        success = success | (~done & info["success"])
        progress = jnp.where(done, progress, info["progress"])
        length = length + (~done).astype(jnp.int32)
        return (state, task_evidence(possible, view, action), done | terminated | truncated, success, progress, length), None

    init = (state, log_posterior, jnp.bool_(False), jnp.bool_(False), jnp.int32(0), jnp.int32(0))
    (*_, success, progress, length), _ = jax.lax.scan(step, init, jax.random.split(key_steps, env.max_steps))
    return rollout.Episode(success, progress, length)


AFTER = ("A", "B", "C", "D", "start")  # by the subgoal completed last; "start": none yet


def wrong_colour_watch(params):
    """`watch(state, action, next_state)` for `rollout.run_episode`: [3] int32, (1 if the step
    entered a colour that ended the episode, else 0; and where it did so with the next subgoal
    open (even progress: the choice a task-blind model must make), the subgoal completed last (4:
    none yet) and the subgoal of the colour stepped onto, else -1 and -1)."""

    def watch(state, action, next_state) -> jax.Array:
        colours = params.tasks.colours[pinpad.first_alive(state.alive)]
        last = jnp.where(state.progress > 0, colours[jnp.maximum(state.progress - 1, 0)] // 2, 4)
        on_colour = state.colour_cells == next_state.agent
        wrong = (next_state.agent != state.agent) & jnp.any(on_colour) & ~jnp.any(next_state.alive)
        choice = jnp.where(wrong & (state.progress % 2 == 0), jnp.stack([last, jnp.argmax(on_colour) // 2]), -1)
        return jnp.concatenate([wrong[None].astype(jnp.int32), choice])

    return watch


def closed_loop_failures(model, env: GridPinpad, key: jax.Array, episodes: int) -> dict[str, int]:
    """How `model`'s "any pretraining task" episodes end without success (same keys, same layouts
    as `closed_loop_success`): `X->Y` counts those that, right after subgoal X (`start`: before
    any), stepped onto a colour of subgoal Y that no task continuing the history has next;
    `wrong_colour_within_subgoal` those that stepped onto a wrong colour inside a subgoal;
    `truncated` those that ran out of time."""
    params = env.pretrain_params(any_task=True)

    @jax.jit
    def run(keys):
        return jax.vmap(lambda k: rollout.run_episode(model, env, params, k, watch=wrong_colour_watch(params)))(keys)

    result = jax.device_get(run(jax.random.split(key, episodes)))
    wrong, last, chosen = result.watched[np.arange(episodes), np.maximum(result.length - 1, 0)].T
    counts = {"truncated": int(np.sum(~result.success & (wrong == 0))),
              "wrong_colour_within_subgoal": int(np.sum((wrong == 1) & (last < 0)))}
    for x, y in zip(last[last >= 0], chosen[last >= 0]):
        name = f"{AFTER[x]}->{AFTER[y]}"
        counts[name] = counts.get(name, 0) + 1
    return counts


def closed_loop_success(model, env: GridPinpad, epsilon: float, key: jax.Array, episodes: int) -> dict[str, float]:
    """"Any pretraining task" success of `model` (sampling, as the pretrain stage evaluates it) and
    of the Bayes-optimal task-blind policy, on the same `episodes` layouts."""
    params = env.pretrain_params(any_task=True)
    keys = jax.random.split(key, episodes)

    @jax.jit
    def measure():
        bayes = jax.vmap(lambda k: bayes_policy_episode(env, params, epsilon, k))(keys)
        return {"model": rollout.evaluate(model, env, params, keys)["success_rate"], "bayes": jnp.mean(bayes.success)}

    return {name: float(value) for name, value in measure().items()}
