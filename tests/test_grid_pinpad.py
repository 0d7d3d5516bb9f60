"""gridworld-pinpad rules on hand-made layouts, task tables, determinism and batching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from envs import pinpad
from envs.grid_pinpad import OBS_DIM, GridPinpad, GridState, task_is_solvable, task_steps_needed

UP, RIGHT, DOWN, LEFT = 0, 1, 2, 3
KEY = jax.random.key(0)


def cell(row, col):
    return row * 7 + col


# Colours 0, 1 right of the agent, 4 and 5 above colour 1, the rest out of the way on the bottom row.
LAYOUT = dict(
    agent=cell(3, 3),
    colours=[cell(3, 4), cell(3, 5), cell(6, 0), cell(6, 1), cell(2, 5), cell(1, 5), cell(6, 2), cell(6, 3)],
    walls=[cell(0, 0), cell(0, 1), cell(5, 5), cell(4, 4)],
)


def make_state(params, agent=LAYOUT["agent"], colours=LAYOUT["colours"], walls=LAYOUT["walls"], task=0):
    alive = jnp.where(params.any_task, True, jnp.arange(params.tasks.size) == task)
    return GridState(
        agent=jnp.int32(agent),
        colour_cells=jnp.asarray(colours, jnp.int32),
        wall_cells=jnp.asarray(walls, jnp.int32),
        task=jnp.int32(task),
        alive=alive,
        progress=jnp.int32(0),
        t=jnp.int32(0),
    )


def play(env, state, params, actions):
    """Steps through `actions`; returns the per-step (reward, terminated, truncated, info) and state."""
    outcomes = []
    for action in actions:
        _, state, reward, terminated, truncated, info = env.step(KEY, state, jnp.int32(action), params)
        outcomes.append((float(reward), bool(terminated), bool(truncated), jax.tree.map(int, info)))
    return outcomes, state


@pytest.fixture(scope="module")
def env():
    return GridPinpad()


@pytest.fixture(scope="module")
def a_c_a(env):
    return env.task_params(["A-C-A"], [0])  # colours 0 1 4 5 0 1


def test_registry_and_spaces():
    env = envs.make("GridPinpad-v0")
    assert isinstance(env, GridPinpad)
    assert env.observation_space.shape == (OBS_DIM,) == (637,)
    assert env.action_space.n == 4
    assert env.max_steps == 100
    with pytest.raises(ValueError, match="unknown environment"):
        envs.make("NoSuchEnv-v0")


def test_observation_encodes_walls_colours_and_agent(env, a_c_a):
    state = make_state(a_c_a)
    grid = np.asarray(env.observe(state, a_c_a)).reshape(7, 7, 13)
    assert grid.sum() == 13  # one channel per object, each on exactly one cell
    assert grid[0, 0, 0] == 1 and grid[4, 4, 3] == 1  # walls 0 and 3
    assert grid[3, 4, 4] == 1 and grid[1, 5, 4 + 5] == 1  # colours 0 and 5
    assert grid[3, 3, 12] == 1  # the agent
    assert grid.sum(axis=(0, 1)).tolist() == [1] * 13


def test_scripted_solution_succeeds_with_reward_only_at_the_end(env, a_c_a):
    actions = [RIGHT, RIGHT, UP, UP, LEFT, DOWN, DOWN, RIGHT]
    outcomes, state = play(env, make_state(a_c_a), a_c_a, actions)
    rewards = [r for r, *_ in outcomes]
    assert rewards == [0.0] * 7 + [1.0]
    assert [term for _, term, _, _ in outcomes] == [False] * 7 + [True]
    assert not any(trunc for _, _, trunc, _ in outcomes)
    assert [info["progress"] for *_, info in outcomes] == [1, 2, 3, 4, 4, 4, 5, 6]
    assert outcomes[-1][3]["success"] == 1
    # Ground-truth subgoal after each step: A, then C after colour 1, then A again after colour 5.
    assert [info["subgoal"] for *_, info in outcomes][:-1] == [0, 2, 2, 0, 0, 0, 0]
    assert int(state.t) == 8


def test_wrong_colour_ends_the_episode_as_failure(env, a_c_a):
    outcomes, _ = play(env, make_state(a_c_a), a_c_a, [RIGHT, UP, RIGHT])  # 0, then 4 before 1
    (r1, t1, _, _), _, (r3, t3, tr3, info3) = outcomes
    assert not t1 and t3 and not tr3
    assert r3 == 0.0 and info3["success"] == 0 and info3["progress"] == 1  # the wrong colour does not count


def test_standing_on_a_colour_does_not_visit_it_again(env, a_c_a):
    # After visiting colour 0, bump into the wall below: the agent stays on colour 0. Were that a
    # second visit of 0 (expected next: 1) the episode would fail.
    outcomes, state = play(env, make_state(a_c_a), a_c_a, [RIGHT, DOWN, DOWN])
    assert int(state.agent) == cell(3, 4)
    assert [term for _, term, _, _ in outcomes] == [False, False, False]
    assert int(state.progress) == 1


def test_leaving_and_reentering_a_colour_visits_it_again(env, a_c_a):
    outcomes, _ = play(env, make_state(a_c_a), a_c_a, [RIGHT, LEFT, RIGHT])  # 0, away, 0 again
    assert [term for _, term, _, _ in outcomes] == [False, False, True]
    assert outcomes[-1][0] == 0.0


def test_walls_and_borders_block_moves(env, a_c_a):
    state = make_state(a_c_a, agent=cell(0, 2))
    _, state, *_ = env.step(KEY, state, jnp.int32(LEFT), a_c_a)  # wall at (0, 1)
    assert int(state.agent) == cell(0, 2)
    _, state, *_ = env.step(KEY, state, jnp.int32(UP), a_c_a)  # border
    assert int(state.agent) == cell(0, 2)
    _, state, *_ = env.step(KEY, state, jnp.int32(RIGHT), a_c_a)
    assert int(state.agent) == cell(0, 3)
    corner = make_state(a_c_a, agent=cell(6, 6))
    for action in (DOWN, RIGHT):
        _, after, *_ = env.step(KEY, corner, jnp.int32(action), a_c_a)
        assert int(after.agent) == cell(6, 6)


def test_truncation_at_the_horizon_is_not_termination(env, a_c_a):
    state = make_state(a_c_a, agent=cell(0, 3))
    step = jax.jit(env.step)
    for t in range(1, 101):
        _, state, reward, terminated, truncated, _ = step(KEY, state, jnp.int32(UP), a_c_a)  # bump the border
        assert not terminated and reward == 0.0
        assert bool(truncated) == (t == 100)


def test_any_task_mode(env):
    params = env.pretrain_params(any_task=True)
    # Colours 0 1 4 5 0 1 complete A-C-A, one of the 16 tasks.
    outcomes, _ = play(env, make_state(params), params, [RIGHT, RIGHT, UP, UP, LEFT, DOWN, DOWN, RIGHT])
    assert outcomes[-1][:2] == (1.0, True)
    assert outcomes[-1][3]["task_id"] == pinpad.GRID_PRETRAIN_TASKS.index("A-C-A")
    # Colour 0 then 2: no task starts with 0 followed by 2 (A is 0 then 1).
    colours = [cell(3, 4), cell(6, 0), cell(3, 5)] + LAYOUT["colours"][3:]
    outcomes, _ = play(env, make_state(params, colours=colours), params, [RIGHT, RIGHT])
    assert outcomes[0][1] is False and outcomes[1][1] is True and outcomes[1][0] == 0.0


def test_random_task_mode_draws_every_task_uniformly(env):
    params = env.pretrain_params()
    keys = jax.random.split(KEY, 16000)
    _, states = jax.jit(jax.vmap(env.reset, (0, None)))(keys, params)
    counts = np.bincount(np.asarray(states.task), minlength=16)
    assert counts.min() > 850 and counts.max() < 1150  # 1000 each, +- 5 sigma
    assert np.array_equal(np.asarray(states.alive).sum(1), np.ones(16000))


def test_reset_draws_distinct_cells_uniformly(env):
    keys = jax.random.split(KEY, 49000)
    _, states = jax.jit(jax.vmap(env.reset, (0, None)))(keys, env.default_params)
    cells = np.concatenate(
        [np.asarray(states.agent)[:, None], np.asarray(states.colour_cells), np.asarray(states.wall_cells)], axis=1
    )
    assert all(len(set(row)) == 13 for row in cells[:2000])
    for column in (0, 5, 12):  # agent, a colour, a wall: uniform over 49 cells (1000 each)
        counts = np.bincount(cells[:, column], minlength=49)
        assert counts.min() > 820 and counts.max() < 1180


def test_task_tables():
    assert len(pinpad.GRID_PRETRAIN_TASKS) == len(set(pinpad.GRID_PRETRAIN_TASKS)) == 16
    assert pinpad.grid_task_colours("A-C-A") == (0, 1, 4, 5, 0, 1)
    assert pinpad.grid_task_colours(pinpad.GRID_POSTTRAIN_TASK) == (0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3)
    assert len(pinpad.ANT_PRETRAIN_TASKS) == len(set(pinpad.ANT_PRETRAIN_TASKS)) == 16
    with pytest.raises(ValueError, match="unknown grid subgoal"):
        pinpad.grid_task_colours("A-E")
    env = GridPinpad()
    assert env.pretrain_subgoal_sequences[:2] == ((0, 2, 0), (0, 2, 1))  # A-C-A, A-C-B
    b_then_c = env.subgoal_task_params((1, 2))
    assert tuple(int(c) for c in b_then_c.tasks.colours[0] if c >= 0) == (2, 3, 4, 5)
    assert int(b_then_c.tasks.ids[0]) == pinpad.OTHER_TASK_ID and not bool(b_then_c.any_task)


@pytest.mark.parametrize(
    "pretrain, posttrain",
    [
        ([t.split("-") for t in pinpad.GRID_PRETRAIN_TASKS], [pinpad.GRID_POSTTRAIN_TASK.split("-")]),
        (pinpad.ANT_PRETRAIN_TASKS, [pinpad.ANT_POSTTRAIN_TASK]),
    ],
)
def test_posttraining_task_uses_only_unseen_subgoal_transitions(pretrain, posttrain):
    seen = pinpad.subgoal_transitions(pretrain)
    needed = pinpad.subgoal_transitions(posttrain)
    assert needed and not needed & seen
    assert len(posttrain[0]) > len(pretrain[0])  # and longer: length generalisation


def test_same_key_same_trajectory_and_vmap_equals_single(env):
    params = env.pretrain_params()

    def rollout(key):
        obs, state = env.reset(key, params)

        def body(state, k):
            obs, state, reward, terminated, truncated, info = env.step(k, state, jax.random.randint(k, (), 0, 4), params)
            return state, (obs, reward, terminated, truncated, info["progress"])

        return jax.lax.scan(body, state, jax.random.split(key, 30))[1]

    keys = jax.random.split(KEY, 6)
    first, second = jax.jit(rollout)(keys[0]), jax.jit(rollout)(keys[0])
    jax.tree.map(np.testing.assert_array_equal, first, second)
    batched = jax.jit(jax.vmap(rollout))(keys)
    for i in range(6):
        single = jax.jit(rollout)(keys[i])
        jax.tree.map(lambda b, s: np.testing.assert_array_equal(b[i], s), batched, single)


def test_task_set_validation():
    with pytest.raises(ValueError, match="repeats a colour"):
        pinpad.make_task_set([(0, 0, 1)], [0], 12, 8)
    with pytest.raises(ValueError, match="outside"):
        pinpad.make_task_set([(0, 9)], [0], 12, 8)
    with pytest.raises(ValueError, match="length"):
        pinpad.make_task_set([tuple(range(8)) * 2], [0], 12, 8)


def test_solvable_only_layouts(env):
    params = env.posttrain_params()
    keys = jax.random.split(KEY, 2000)
    check = jax.vmap(lambda s: task_is_solvable(s, params, 100))
    _, uniform = jax.jit(jax.vmap(env.reset, (0, None)))(keys, params)
    share = float(jnp.mean(check(uniform)))
    assert 0.7 < share < 0.9  # about 80% of uniform layouts (documented in the module)
    solvable_env = GridPinpad(solvable_only=True)
    _, filtered = jax.jit(jax.vmap(solvable_env.reset, (0, None)))(keys, params)
    assert bool(jnp.all(check(filtered)))
    # Keys whose first draw is solvable give the same layout in both environments.
    first_ok = np.asarray(check(uniform))
    np.testing.assert_array_equal(np.asarray(filtered.colour_cells)[first_ok], np.asarray(uniform.colour_cells)[first_ok])


def test_any_task_episodes_have_the_layouts_of_the_data():
    # A base model that cannot see the task is scored on any task, on the layouts its expert's data
    # has: the same draws and redraws as episodes of a drawn task, so no demonstrated task is walled in.
    solvable_env = GridPinpad(solvable_only=True)
    keys = jax.random.split(KEY, 500)
    reset = jax.jit(jax.vmap(solvable_env.reset, (0, None)))
    _, drawn = reset(keys, solvable_env.pretrain_params())
    _, any_task = reset(keys, solvable_env.pretrain_params(any_task=True))
    for field in ("agent", "colour_cells", "wall_cells", "task"):
        np.testing.assert_array_equal(getattr(any_task, field), getattr(drawn, field))
    assert bool(jnp.all(any_task.alive))  # yet every task counts
    tasks = solvable_env.pretrain_params().tasks
    steps = jax.vmap(lambda s: task_steps_needed(s, tasks, s.task))(any_task)
    assert bool(jnp.all(steps <= solvable_env.horizon))


def test_solvable_only_reset_returns_when_the_horizon_is_too_short_for_any_layout(env):
    # Twelve colours cannot be visited in 5 steps: the redraws give up instead of looping forever.
    params = env.posttrain_params()
    short = GridPinpad(horizon=5, solvable_only=True)
    _, state = jax.jit(short.reset)(KEY, params)
    assert not bool(task_is_solvable(state, params, 5))
