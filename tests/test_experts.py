"""The shortest-path expert: optimal, uniform among optimal moves, safe when noisy, and it solves
every solvable layout of every task."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs import pinpad
from envs.experts import expert_probabilities, labelled_action, per_task, shortest_path_action, subgoal_start_labels
from envs.grid_pinpad import GridPinpad, GridState, task_is_solvable, task_steps_needed

KEY = jax.random.key(1)


def run_expert(env, params, keys, epsilon=0.0):
    """Per episode: (solvable at reset, success, failure, length)."""
    return [np.asarray(x) for x in _run_expert(env, params, keys, epsilon)]


@partial(jax.jit, static_argnums=0)
def _run_expert(env, params, keys, epsilon):
    def episode(key):
        key_reset, key_steps = jax.random.split(key)
        _, state = env.reset(key_reset, params)
        solvable = task_is_solvable(state, params, env.horizon)

        def body(carry, k):
            state, done, success, failure, length = carry
            action, _ = shortest_path_action(k, state, params, epsilon)
            _, new, _, terminated, truncated, info = env.step(k, state, action, params)
            state = jax.tree.map(lambda old, n: jnp.where(done, old, n), state, new)
            success = success | (~done & info["success"])
            failure = failure | (~done & terminated & ~info["success"])
            return (state, done | terminated | truncated, success, failure, length + ~done), None

        init = (state, False, False, False, 0)
        (_, _, success, failure, length), _ = jax.lax.scan(body, init, jax.random.split(key_steps, env.horizon))
        return solvable, success, failure, length

    return jax.vmap(episode)(keys)


ENV = GridPinpad()


@pytest.mark.parametrize("task", list(pinpad.GRID_PRETRAIN_TASKS) + [pinpad.GRID_POSTTRAIN_TASK])
def test_expert_solves_exactly_the_solvable_layouts(task):
    env = ENV  # one environment object: one compilation for every task
    params = env.task_params([task], [0])
    solvable, success, failure, _ = run_expert(env, params, jax.random.split(KEY, 300))
    assert solvable.mean() > 0.5  # the check is not vacuous
    np.testing.assert_array_equal(success, solvable)
    # Never a wrong colour where there is a way, even in layouts it cannot finish (unless boxed in).
    assert not failure[solvable].any()
    assert failure.mean() < 0.05


def test_noisy_expert_never_steps_on_a_wrong_colour():
    env = GridPinpad(solvable_only=True)
    solvable, success, failure, length = run_expert(env, env.pretrain_params(), jax.random.split(KEY, 300), epsilon=1.0)
    assert not failure.any()
    clean = run_expert(env, env.pretrain_params(), jax.random.split(KEY, 300))
    assert length.mean() > clean[3].mean()  # random moves take longer than shortest paths


def layout_state(params, agent, target_cell):
    """Agent and colour 0 (the target) placed by hand; other colours and walls in the bottom row."""
    colours = [target_cell] + [42 + i for i in range(7)]
    return GridState(
        agent=jnp.int32(agent),
        colour_cells=jnp.asarray(colours, jnp.int32),
        wall_cells=jnp.asarray([35, 36, 37, 38], jnp.int32),
        task=jnp.int32(0),
        alive=jnp.array([True]),
        progress=jnp.int32(0),
        t=jnp.int32(0),
    )


def test_expert_is_uniform_among_optimal_moves():
    env = GridPinpad()
    params = env.task_params(["A-B-C"], [0])
    state = layout_state(params, agent=8, target_cell=16)  # (1,1) -> (2,2): down or right
    actions, reachable = jax.vmap(lambda k: shortest_path_action(k, state, params))(jax.random.split(KEY, 4000))
    counts = np.bincount(np.asarray(actions), minlength=4)
    assert counts[0] == counts[3] == 0
    assert 1800 < counts[1] < 2200 and 1800 < counts[2] < 2200
    assert bool(jnp.all(reachable))
    np.testing.assert_array_equal(expert_probabilities(state, params), [0.0, 0.5, 0.5, 0.0])
    # The labelled expert: the same draws as the plain (noisy) expert, the clean distribution beside.
    for key in jax.random.split(KEY, 20):
        action, probs = labelled_action(key, state, params, 0.5)
        assert int(action) == int(shortest_path_action(key, state, params, 0.5)[0])
        np.testing.assert_array_equal(probs, [0.0, 0.5, 0.5, 0.0])


def test_expert_reports_an_unreachable_target():
    env = GridPinpad()
    params = env.task_params(["A-B-C"], [0])
    state = layout_state(params, agent=8, target_cell=0)  # corner (0,0) ...
    state = state.replace(wall_cells=jnp.asarray([1, 7, 36, 37], jnp.int32))  # ... walled in
    _, reachable = shortest_path_action(KEY, state, params)
    assert not bool(reachable)
    # Then the expert's distribution is uniform over the safe moves (here: all, as no colour is adjacent).
    np.testing.assert_array_equal(expert_probabilities(state, params), [0.25] * 4)
    assert not bool(task_is_solvable(state, params, env.horizon))


def test_the_task_blind_view_agrees_with_the_expert_and_the_solvability_check():
    # per_task's one search per colour against the expert's own search per task, and its leg
    # lengths against task_steps_needed, on fresh layouts and on states mid-episode.
    env = GridPinpad()
    params = env.pretrain_params()

    def check(key):
        key_reset, key_progress, key_t = jax.random.split(key, 3)
        _, state = env.reset(key_reset, params)
        state = state.replace(progress=2 * jax.random.randint(key_progress, (), 0, 3), t=jax.random.randint(key_t, (), 0, 60))
        view = per_task(state, params, 0.2, env.horizon)
        tasks = jnp.arange(params.tasks.size)
        as_task = jax.vmap(lambda k: state.replace(alive=tasks == k))(tasks)
        clean = jax.vmap(expert_probabilities, (0, None))(as_task, params)
        needed = jax.vmap(lambda k: task_steps_needed(state, params.tasks, k))(tasks)
        return view, clean, needed <= env.horizon - state.t

    view, clean, doable = jax.jit(jax.vmap(check))(jax.random.split(KEY, 200))
    consistent = np.asarray(view.consistent)
    np.testing.assert_allclose(np.asarray(view.clean)[consistent], np.asarray(clean)[consistent], atol=1e-6)
    np.testing.assert_array_equal(view.doable, doable)
    assert 0.05 < float(np.mean(doable)) < 0.95  # both kinds of task occur
    np.testing.assert_allclose(np.asarray(view.moves).sum(-1), 1.0, atol=1e-5)


def test_subgoal_start_labels_are_the_experts_move_had_the_task_that_next_subgoal():
    env = GridPinpad()

    def at_reset(key):  # every subgoal g against the expert of a task that starts with g
        _, state = env.reset(key, env.pretrain_params())
        as_first = [expert_probabilities(state, env.subgoal_task_params((g, (g + 1) % 4))) for g in range(4)]
        return subgoal_start_labels(state, env.pretrain_params()), jnp.stack(as_first)

    labels, as_first = jax.jit(jax.vmap(at_reset))(jax.random.split(KEY, 100))
    np.testing.assert_allclose(labels.moves, as_first, atol=1e-6)
    assert bool(jnp.all(labels.between_subgoals))

    # Along the clean expert's post-training episodes, whose every transition no pretraining task
    # has: between subgoals, the label of the real next subgoal is the expert's own move.
    params = env.posttrain_params()

    def episode(key):
        _, state = env.reset(key, params)

        def step(state, k):
            action, _ = shortest_path_action(k, state, params)
            record = (subgoal_start_labels(state, params), expert_probabilities(state, params),
                      env.subgoal(state, params), state.progress)
            return env.step(k, state, action, params)[1], record

        return jax.lax.scan(step, state, jax.random.split(key, 30))[1]

    labels, expert, subgoal, progress = jax.jit(jax.vmap(episode))(jax.random.split(KEY, 50))
    np.testing.assert_array_equal(labels.between_subgoals, np.asarray(progress) % 2 == 0)
    between = np.asarray(labels.between_subgoals) & (np.asarray(progress) < 12)
    own = np.take_along_axis(np.asarray(labels.moves), np.asarray(subgoal)[..., None, None], axis=-2)[..., 0, :]
    np.testing.assert_allclose(own[between], np.asarray(expert)[between], atol=1e-6)
    assert np.asarray(progress)[between].max() >= 4  # past A -> B, an unseen transition
