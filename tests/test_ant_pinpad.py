"""ant-pinpad on MJX: the termination rules and the visit rule on hand-made states (through the real
physics where a push can produce them), the horizon, determinism, batching, the start
distribution, the task tables, the gymnasium adapter, the trajectory plot, and AntGoal's radius.

Compilation dominates the time: every jitted function is built once per module (fixtures)."""

import warnings

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs import pinpad
from envs.ant_goal import SUCCESS_RADIUS, AntGoal, AntGoalState
from envs.ant_pinpad import (
    CELL_SIZE,
    HALF_EXTENT,
    OBS_DIM,
    QVEL_DIM,
    AntBody,
    AntPinpad,
    AntPinpadState,
    cell_centre,
    cell_of,
    home_pose,
    task_is_solvable,
)
from envs.gymnasium import AntPinpadVectorEnv
from envs.render import plot_ant_trajectory

KEY = jax.random.key(0)
HORIZON = 500


def cell(row, col):
    return row * 4 + col


# row 0: colour 0, colour 1, -, -        the ant starts in (1, 0), the wall is (1, 1)
# row 1: start, wall, -, colour 3
# row 2: colour 2, -, -, -
# row 3: -, -, -, -
START, WALL = cell(1, 0), cell(1, 1)
COLOURS = [cell(0, 0), cell(0, 1), cell(2, 0), cell(1, 3)]


def body(x, y, z=0.6, vx=0.0, vy=0.0):
    """The ant in its standing pose at (x, y, z), moving at (vx, vy) m/s."""
    qpos = np.array(home_pose())
    qpos[:3] = x, y, z
    qvel = np.zeros(QVEL_DIM, np.float32)
    qvel[:2] = vx, vy
    return AntBody(qpos=jnp.asarray(qpos), qvel=jnp.asarray(qvel), warmstart=jnp.zeros(QVEL_DIM))


def make_state(params, ant, task=0):
    alive = jnp.where(params.any_task, True, jnp.arange(params.tasks.size) == task)
    return AntPinpadState(
        body=ant,
        cell=cell_of(ant.qpos[:2]),
        colour_cells=jnp.asarray(COLOURS, jnp.int32),
        wall_cells=jnp.asarray([WALL], jnp.int32),
        task=jnp.int32(task),
        alive=alive,
        progress=jnp.int32(0),
        t=jnp.int32(0),
    )


def centre(c):
    return np.asarray(cell_centre(jnp.int32(c)))


@pytest.fixture(scope="module")
def env():
    return AntPinpad(horizon=HORIZON)


@pytest.fixture(scope="module")
def step(env):
    return jax.jit(env.step)


@pytest.fixture(scope="module")
def transition(env):
    return jax.jit(env.transition)


@pytest.fixture(scope="module")
def rollout(env):
    """jit of (key, start state, params, actions [T, 8]) -> per step (obs, reward, terminated,
    truncated, progress, torso x, y), continuing past the end of the episode (the rules just keep
    applying). One compiled program for every test that calls it with T = HORIZON and one task."""

    def run(key, state, params, actions):
        def body_fn(state, inputs):
            k, action = inputs
            obs, state, reward, terminated, truncated, info = env.step(k, state, action, params)
            return state, (obs, reward, terminated, truncated, info["progress"], state.body.qpos[:2])

        return jax.lax.scan(body_fn, state, (jax.random.split(key, actions.shape[0]), actions))[1]

    return run


def test_a_push_onto_the_wrong_colour_fails_and_onto_the_right_one_advances(env, step):
    # From the start cell's top edge, moving up at 4 m/s: the torso enters colour 0's cell.
    x, y = centre(START)[0], 2.0 - 0.05
    for task, (reward, terminated, progress) in [(0, (0.0, False, 1)), (7, (0.0, True, 0))]:
        params = env.fixed_task_params(task)  # task 0 is 0-3-2, task 7 is 1-0-2
        state = make_state(params, body(x, y, vy=4.0), task=0)
        obs, after, r, term, trunc, info = step(KEY, state, jnp.zeros(8), params)
        assert int(after.cell) == COLOURS[0]
        assert (float(r), bool(term), int(info["progress"])) == (reward, terminated, progress)
        assert not bool(info["success"]) and not bool(trunc) and obs.shape == (OBS_DIM,)


def test_entering_the_wall_cell_or_leaving_the_arena_terminates(env, step):
    params = env.fixed_task_params(0)
    pushes = {
        "wall": body(-2.0 - 0.05, centre(START)[1], vx=4.0),  # the wall is right of the start
        "outside": body(-HALF_EXTENT + 0.05, centre(START)[1], vx=-4.0),  # the arena's left edge
        "stays": body(*centre(START)[:2], vx=0.0),
    }
    for name, ant in pushes.items():
        _, after, reward, terminated, truncated, info = step(KEY, make_state(params, ant), jnp.zeros(8), params)
        assert bool(terminated) == (name != "stays"), name
        assert float(reward) == 0.0 and not bool(info["success"]) and not bool(truncated)
    _, after, *_ = step(KEY, make_state(params, pushes["wall"]), jnp.zeros(8), params)
    assert int(after.cell) == WALL


def test_torso_height_outside_the_healthy_range_terminates(env, step, transition):
    params = env.fixed_task_params(0)
    x, y = centre(START)
    for height, ends in [(0.15, True), (0.25, False), (0.95, False), (1.05, True)]:
        state = make_state(params, body(x, y))
        *_, terminated, truncated, info = transition(state, body(x, y, z=height), params)
        assert bool(terminated) == ends, height
        assert not bool(info["success"]) and not bool(truncated)
    # Through the physics: dropped from 3 m, the torso is still above 1 m after one step (0.05 s).
    *_, terminated, _, _ = step(KEY, make_state(params, body(x, y, z=3.0)), jnp.zeros(8), params)
    assert bool(terminated)
    nan_body = body(x, y).replace(qvel=jnp.full(QVEL_DIM, jnp.nan))
    assert bool(transition(make_state(params, body(x, y)), nan_body, params)[3])


def test_visit_rule_counts_entering_from_another_cell_only(env, transition):
    params = env.fixed_task_params(0)  # 0-3-2
    c0 = centre(COLOURS[0])
    path = [
        (c0, 1, False),  # enter colour 0 from the start cell: a visit
        (c0 + 0.5, 1, False),  # walk around inside it: no new visit
        (c0 - 0.5, 1, False),
        (centre(START), 1, False),  # leave to an empty cell
        (c0, 1, True),  # re-enter colour 0: a visit, and 0 is not next (3 is): failure, no progress
    ]
    state = make_state(params, body(*centre(START)))
    for xy, progress, ends in path:
        _, state, reward, terminated, _, info = transition(state, body(*xy), params)
        assert (int(info["progress"]), bool(terminated)) == (progress, ends), xy
        assert float(reward) == 0.0


def test_the_posttraining_task_succeeds_in_order(env, transition):
    params = env.posttrain_params()  # 0-1-2-3
    state = make_state(params, body(*centre(START)))
    # 0, 1, then around the wall to 2 without touching 3, then along the bottom row up to 3.
    route = [COLOURS[0], COLOURS[1], cell(0, 2), cell(1, 2), cell(2, 2), cell(2, 1), COLOURS[2],
             cell(3, 0), cell(3, 1), cell(3, 2), cell(3, 3), cell(2, 3), COLOURS[3]]
    subgoals = []
    for c in route:
        _, state, reward, terminated, _, info = transition(state, body(*centre(c)), params)
        subgoals.append(int(info["subgoal"]))
        assert not bool(terminated) or c == route[-1]
    assert float(reward) == 1.0 and bool(info["success"]) and int(info["progress"]) == 4
    assert int(info["task_id"]) == pinpad.POSTTRAIN_TASK_ID and subgoals[0] == 1 and subgoals[-1] == -1
    assert int(env.subgoal(make_state(params, body(*centre(START))), params)) == 0


def test_truncation_at_the_horizon_and_the_trajectory_plot(env, rollout, tmp_path):
    params = env.fixed_task_params(0)
    state = make_state(params, body(*centre(cell(3, 3))))  # an empty corner, standing still
    out = jax.jit(rollout)(KEY, state, params, jnp.zeros((HORIZON, 8)))
    _, reward, terminated, truncated, _, xy = jax.device_get(out)
    assert not terminated.any() and reward.sum() == 0.0
    assert truncated[-1] and not truncated[:-1].any()
    assert all(int(cell_of(jnp.asarray(p))) == cell(3, 3) for p in xy[::50])  # it stayed in its cell
    png = plot_ant_trajectory(tmp_path / "ant.png", xy, COLOURS, [WALL], "truncated at 500")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_key_same_trajectory_and_vmap_equals_single(env, rollout):
    params = env.fixed_task_params(0)  # the truncation test's shapes: its compiled rollout is reused
    keys = jax.random.split(KEY, 3)
    _, starts = jax.jit(jax.vmap(env.reset, (0, None)))(keys, params)
    actions = jax.random.uniform(KEY, (3, HORIZON, 8), minval=-1.0, maxval=1.0)
    single = jax.jit(rollout)

    def start(i):
        return jax.tree.map(lambda x: x[i], starts)

    first, second = single(keys[0], start(0), params, actions[0]), single(keys[0], start(0), params, actions[0])
    jax.tree.map(np.testing.assert_array_equal, first, second)
    assert np.abs(np.diff(np.asarray(first[5][:60]), axis=0)).sum() > 0.1  # the ant moved
    batched = jax.jit(jax.vmap(rollout, (0, 0, None, 0)))(keys, starts, params, actions)
    for i in range(3):
        one = single(keys[i], start(i), params, actions[i])
        # The batched program is a different XLA program: its floats differ in the last bits (about
        # 1e-6 after one step), and contacts amplify that over tens of steps, so compare the first 10.
        for b, s in zip(batched, one):
            np.testing.assert_allclose(np.asarray(b[i][:10], np.float64), np.asarray(s[:10], np.float64), atol=1e-3)


def test_reset_draws_the_start_state_of_the_spec(env):
    params = env.pretrain_params()
    obs, states = jax.jit(jax.vmap(env.reset, (0, None)))(jax.random.split(KEY, 4000), params)
    states = jax.device_get(states)
    cells = np.concatenate([states.cell[:, None], states.colour_cells, states.wall_cells], axis=1)
    assert all(len(set(row)) == 6 for row in cells)
    assert np.array_equal(np.asarray(jax.vmap(cell_of)(jnp.asarray(states.body.qpos[:, :2]))), states.cell)
    counts = np.bincount(states.cell, minlength=16)
    assert counts.min() > 150 and counts.max() < 350  # 250 each
    qpos, qvel = states.body.qpos, states.body.qvel
    joints = qpos[:, 7:] - np.asarray(home_pose())[7:]
    assert np.allclose(qpos[:, 2], 0.6) and np.abs(joints).max() <= 0.1 and np.abs(qvel).max() <= 0.1
    yaw = 2 * np.arctan2(qpos[:, 6], qpos[:, 3])
    assert np.allclose(qpos[:, 4:6], 0) and np.histogram(yaw, bins=4, range=(-np.pi, np.pi))[0].min() > 900
    offsets = qpos[:, :2] - np.asarray(cell_centre(jnp.asarray(states.cell)))
    assert np.abs(offsets).max() < CELL_SIZE / 2 and np.abs(offsets).max() > 0.95 * CELL_SIZE / 2
    tasks = np.bincount(states.task, minlength=16)
    assert tasks.min() > 170 and tasks.max() < 330
    assert obs.shape == (4000, OBS_DIM) and np.isfinite(obs).all() and np.abs(obs).max() <= 100


def test_task_tables_and_params(env):
    pre = env.pretrain_params()
    assert [tuple(int(c) for c in row if c >= 0) for row in pre.tasks.colours] == list(pinpad.ANT_PRETRAIN_TASKS)
    assert list(np.asarray(pre.tasks.ids)) == list(range(16)) and set(np.asarray(pre.tasks.lengths)) == {3}
    post = env.posttrain_params()
    assert tuple(np.asarray(post.tasks.colours[0])) == pinpad.ANT_POSTTRAIN_TASK
    assert int(post.tasks.ids[0]) == pinpad.POSTTRAIN_TASK_ID
    assert not pinpad.subgoal_transitions([pinpad.ANT_POSTTRAIN_TASK]) & pinpad.subgoal_transitions(
        pinpad.ANT_PRETRAIN_TASKS
    )
    assert env.num_subgoals == 4 and env.max_steps == 500 and env.action_space.shape == (8,)
    assert env.pretrain_subgoal_sequences == pinpad.ANT_PRETRAIN_TASKS  # each colour is a subgoal
    assert tuple(int(c) for c in env.subgoal_task_params((3, 0)).tasks.colours[0] if c >= 0) == (3, 0)
    assert isinstance(envs.make("AntPinpad-v0"), AntPinpad) and isinstance(envs.make("AntGoal-v0"), AntGoal)


def test_ant_pinpad_goal_appends_the_progress_count_and_asks_for_the_task_to_be_complete(env):
    goal_env = envs.make("AntPinpadGoal-v0", horizon=HORIZON)  # CRL's goal space on ant-pinpad
    space = goal_env.observation_space
    assert space.shape == (OBS_DIM + 5,) and (space.low, space.high) == (env.observation_space.low, env.observation_space.high)
    params = goal_env.default_params
    assert int(params.tasks.ids[0]) == pinpad.POSTTRAIN_TASK_ID
    obs, state = jax.jit(goal_env.reset)(KEY, params)
    np.testing.assert_array_equal(goal_env.desired_goal(state, params), np.eye(5)[4])  # 4 colours visited
    np.testing.assert_array_equal(goal_env.achieved_goal(obs), np.eye(5)[0])
    np.testing.assert_array_equal(obs[:OBS_DIM], env.observe(state, params))
    assert isinstance(envs.make("AntGoal-v0", solvable_only=True), AntGoal)  # accepted like every env's


def test_any_task_mode_accepts_every_pretraining_task(env, transition):
    params = env.pretrain_params(any_task=True)
    # 2-1-0 and 2-1-3 are pretraining tasks; 2-3 starts none.
    for route, success in [((2, 1, 0), True), ((2, 1, 3), True), ((2, 3), False)]:
        state = make_state(params, body(*centre(START)))
        for colour in route:
            _, state, reward, terminated, _, info = transition(state, body(*centre(COLOURS[colour])), params)
            _, state, *_ = transition(state, body(*centre(cell(3, 3))), params)  # step off between colours
        assert bool(terminated) and float(reward) == float(success), route


def test_gymnasium_check_env_and_seeding():
    env = gymnasium.make("hrl/AntPinpad-v0", task="posttrain")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    assert [str(w.message) for w in caught] == []
    obs, info = env.reset(seed=3)
    assert obs.dtype == np.float32 and obs in env.observation_space
    assert info == {"success": False, "subgoal": 0, "progress": 0, "task_id": 16}
    again, _ = env.reset(seed=3)
    np.testing.assert_array_equal(obs, again)
    with pytest.raises(ValueError, match="invalid action"):
        env.step(np.zeros(3))
    with pytest.raises(ValueError, match="invalid task"):
        env.reset(options={"task": (0, 1)})


def test_gymnasium_vector_env_steps_every_ant_and_autoresets_in_the_same_step():
    def run(seed):
        vec = gymnasium.make_vec("hrl/AntPinpad-v0", num_envs=2, task="posttrain", horizon=2)
        out = [vec.reset(seed=seed)[0]]
        for _ in range(2):
            obs, reward, terminated, truncated, info = vec.step(np.zeros((2, 8)))
            out.append(obs)
        return vec, np.stack(out), terminated, truncated, info

    vec, trajectory, terminated, truncated, info = run(5)
    assert isinstance(vec.unwrapped, AntPinpadVectorEnv) and trajectory.shape == (3, 2, OBS_DIM)
    assert trajectory.dtype == np.float32 and trajectory[0] in vec.observation_space
    np.testing.assert_array_equal(trajectory, run(5)[1])
    # The horizon of 2 truncates both episodes at the second step: the returned observations start
    # new episodes, the final ones continue the old.
    assert truncated.all() and not terminated.any() and info["_final_obs"].all()
    assert not np.array_equal(trajectory[2], info["final_obs"][0]) and (info["progress"] == 0).all()
    assert info["final_obs"][0].shape == (OBS_DIM,) and set(info["final_info"]) >= {"success", "_success"}
    with pytest.raises(ValueError, match=r"invalid action .*has shape \(8,\)"):
        vec.step(np.zeros(8))
    with pytest.raises(ValueError, match="(?s)invalid action .*not finite"):
        vec.step(np.full((2, 8), np.nan))
    with pytest.raises(ValueError, match=r"render_mode 'rgb_array' not supported; use one of \[None\]"):
        gymnasium.make_vec("hrl/AntPinpad-v0", num_envs=2, render_mode="rgb_array")


def test_gymnasium_render_draws_the_torso_path_so_far():
    env = gymnasium.make("hrl/AntPinpad-v0", render_mode="rgb_array")
    env.reset(seed=0)
    for _ in range(3):
        env.step(env.action_space.sample())
    assert len(env.unwrapped._path) == 4  # the start and one point per step
    frame = env.render()
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3 and frame.std() > 0
    env.reset(seed=1)
    assert len(env.unwrapped._path) == 1  # a new episode starts a new path


def test_goal_variant_success_radius():
    env = AntGoal()
    params = env.default_params
    obs, state = jax.jit(jax.vmap(env.reset, (0, None)))(jax.random.split(KEY, 500), params)
    start = np.asarray(state.body.qpos[:, :2])
    assert np.linalg.norm(start - np.asarray(state.goal), axis=1).min() >= 1.0
    np.testing.assert_array_equal(np.asarray(env.achieved_goal(obs)), start)  # exact: a power-of-two scale
    goal = jnp.array([1.0, -2.0])
    state = AntGoalState(body=body(0.0, 0.0), goal=goal, t=jnp.int32(0))
    transition = jax.jit(env.transition)
    for distance, success in [(SUCCESS_RADIUS - 0.01, True), (SUCCESS_RADIUS + 0.01, False)]:
        obs, _, reward, terminated, _, info = transition(state, body(1.0 + distance, -2.0))
        assert (bool(info["success"]), bool(terminated), float(reward)) == (success, success, float(success))
        np.testing.assert_allclose(np.asarray(env.achieved_goal(obs)), [1.0 + distance, -2.0], rtol=1e-6)
    assert env.goal_space.shape == (2,) and env.observation_space.shape == obs.shape


def test_solvable_only_redraws_layouts_where_a_colour_is_cut_off(env):
    # In the test layout colour 0 at (0, 0) is boxed in by colour 1, the wall and colour 2: after 0,
    # colour 3 cannot be reached (task 0-3-2), while the post-training task's 1 is next door.
    pre, post = env.fixed_task_params(0), env.posttrain_params()
    at_zero = make_state(pre, body(*centre(COLOURS[0]))).replace(progress=jnp.int32(1))
    assert not bool(task_is_solvable(at_zero, pre))
    assert bool(task_is_solvable(make_state(post, body(*centre(START))), post))
    params = env.pretrain_params()
    keys = jax.random.split(KEY, 300)
    check = jax.jit(jax.vmap(lambda s: task_is_solvable(s, params)))
    _, uniform = jax.jit(jax.vmap(env.reset, (0, None)))(keys, params)
    share = float(jnp.mean(check(uniform)))
    assert 0.5 < share < 1.0  # some uniform layouts are unsolvable
    _, filtered = jax.jit(jax.vmap(AntPinpad(solvable_only=True).reset, (0, None)))(keys, params)
    assert bool(jnp.all(check(filtered)))
