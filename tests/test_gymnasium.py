"""The gymnasium adapters: API conformance, configuration, seeding, actions, vector autoreset."""

import warnings

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import AutoresetMode

import envs  # noqa: F401  (registers hrl/GridPinpad-v0)
from envs.grid_pinpad import NUM_CELLS, NUM_CHANNELS, NUM_COLOURS, NUM_WALLS, OBS_DIM
from envs.gymnasium import GridPinpadGymEnv, GridPinpadVectorEnv

ENV_ID = "hrl/GridPinpad-v0"


def layout(obs: np.ndarray) -> np.ndarray:
    """The wall and colour channels of an observation (fixed within an episode)."""
    return obs.reshape(NUM_CELLS, NUM_CHANNELS)[:, : NUM_WALLS + NUM_COLOURS]


def agent_cell(obs: np.ndarray) -> int:
    return int(obs.reshape(NUM_CELLS, NUM_CHANNELS)[:, -1].argmax())


def test_check_env_passes_without_warnings():
    env = gymnasium.make(ENV_ID)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    assert [str(w.message) for w in caught] == []


def test_make_passes_configuration_and_renders():
    env = gymnasium.make(ENV_ID, task="posttrain", solvable_only=True, render_mode="rgb_array")
    obs, info = env.reset(seed=0)
    assert obs.shape == (OBS_DIM,) and obs.dtype == np.uint8 and obs in env.observation_space
    assert info == {"success": False, "subgoal": 0, "progress": 0, "task_id": 16}
    frame = env.render()
    assert frame.ndim == 3 and frame.shape[2] == 3 and frame.dtype == np.uint8


def test_reset_options_last_one_reset():
    env = GridPinpadGymEnv(task="posttrain")
    assert env.reset(seed=0, options={"task": "C-A-D"})[1]["task_id"] == 7
    assert env.reset(options={"task": 3})[1]["task_id"] == 3
    assert env.reset()[1]["task_id"] == 16
    with pytest.raises(ValueError, match="unknown reset option"):
        env.reset(options={"tsk": 3})
    with pytest.raises(ValueError, match="invalid task 16"):
        env.reset(options={"task": 16})
    with pytest.raises(ValueError, match="must be a bool"):
        env.reset(options={"solvable_only": "yes"})


def rollout(env: GridPinpadGymEnv, seed: int, actions) -> list:
    record = [env.reset(seed=seed)]
    for action in actions:
        record.append(env.step(action))
        if record[-1][2] or record[-1][3]:
            break
    return record


def test_same_seed_same_trajectory():
    actions = np.random.default_rng(0).integers(0, 4, 30)
    first, second = rollout(GridPinpadGymEnv(), 7, actions), rollout(GridPinpadGymEnv(), 7, actions)
    assert len(first) == len(second)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a[0], b[0])
        assert a[1:] == b[1:]
    other = rollout(GridPinpadGymEnv(), 8, actions)
    assert not np.array_equal(first[0][0], other[0][0])


@pytest.mark.parametrize("action", [4, -1, 1.5, "up", None, True, np.array([1]), [0, 1], np.float32(np.nan)])
def test_invalid_action_raises_clear_error(action):
    env = GridPinpadGymEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"invalid action .*0\.\.3"):
        env.step(action)


@pytest.mark.parametrize("action", [2, np.int64(2), np.array(2, np.uint8), 2.0])
def test_integer_valued_actions_are_accepted(action):
    env = GridPinpadGymEnv()
    env.reset(seed=0)
    reference = GridPinpadGymEnv()
    reference.reset(seed=0)
    np.testing.assert_array_equal(env.step(action)[0], reference.step(2)[0])


NUM_ENVS = 4  # one size for every vector test: each size compiles its own step


def test_make_vec_uses_the_batched_env():
    vec = gymnasium.make_vec(ENV_ID, num_envs=NUM_ENVS, any_task=True)
    assert isinstance(vec.unwrapped, GridPinpadVectorEnv) and vec.unwrapped.default_config.any_task
    assert vec.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    obs, info = vec.reset(seed=0)
    assert obs.shape == (NUM_ENVS, OBS_DIM) and obs in vec.observation_space
    assert set(info) == {"success", "subgoal", "progress", "task_id", "_success", "_subgoal", "_progress", "_task_id"}
    assert info["_task_id"].all() and (info["progress"] == 0).all()


def test_vector_autoreset_same_step_with_final_obs():
    vec = GridPinpadVectorEnv(num_envs=NUM_ENVS)
    obs, _ = vec.reset(seed=1)
    rng = np.random.default_rng(1)
    for _ in range(vec.jax_env.horizon):  # every episode ends within the horizon
        previous = obs
        obs, reward, terminated, truncated, info = vec.step(rng.integers(0, 4, NUM_ENVS))
        done = terminated | truncated
        if done.any():
            break
    assert done.any()
    np.testing.assert_array_equal(info["_final_obs"], done)
    np.testing.assert_array_equal(info["_final_info"], done)
    for i in np.flatnonzero(done):
        final = info["final_obs"][i]
        # The final observation continues the old episode (same layout, agent moved at most one
        # cell); the returned one starts a new episode.
        np.testing.assert_array_equal(layout(final), layout(previous[i]))
        row, col = divmod(agent_cell(final), 7)
        prev_row, prev_col = divmod(agent_cell(previous[i]), 7)
        assert abs(row - prev_row) + abs(col - prev_col) <= 1
        assert not np.array_equal(layout(obs[i]), layout(previous[i]))
        assert info["progress"][i] == 0 and not info["success"][i]
    for i in np.flatnonzero(~done):
        assert info["final_obs"][i] is None
    assert reward.shape == (NUM_ENVS,) and terminated.dtype == bool


def test_vector_same_seed_same_trajectory_and_checks_actions():
    def run(seed):
        vec = GridPinpadVectorEnv(num_envs=NUM_ENVS)
        out = [vec.reset(seed=seed)[0]]
        for t in range(10):
            out.append(vec.step(np.full(NUM_ENVS, t % 4))[0])
        return np.stack(out)

    np.testing.assert_array_equal(run(3), run(3))
    vec = GridPinpadVectorEnv(num_envs=NUM_ENVS)
    vec.reset(seed=0)
    with pytest.raises(ValueError, match=r"invalid action .*out of range \(\[2\]=7\)"):
        vec.step(np.array([0, 1, 7, 3]))
    with pytest.raises(ValueError, match=r"invalid action .*has shape \(3,\)"):
        vec.step(np.array([0, 1, 2]))
