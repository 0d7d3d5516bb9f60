"""AutoReset semantics, and the batched VmapAutoReset equals vmap(AutoReset) bitwise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs.grid_pinpad import GridPinpad, GridState
from envs.wrappers import AutoReset, EpisodeStats, VmapAutoReset

KEY = jax.random.key(2)


@pytest.fixture(scope="module")
def env():
    return GridPinpad()


def about_to_fail(env, params):
    """Colour 1 is right of the agent; the task starts with colour 0, so moving right fails."""
    _, state = env.reset(KEY, params)
    colours = state.colour_cells.at[1].set(state.agent + 1 if state.agent % 7 < 6 else state.agent - 1)
    return state.replace(colour_cells=colours)


def test_autoreset_starts_a_new_episode_in_the_same_step(env):
    params = env.task_params(["A-B-C"], [0])
    state = about_to_fail(env, params)
    action = jnp.int32(1 if state.agent % 7 < 6 else 3)
    key = jax.random.key(7)
    obs, new_state, reward, terminated, truncated, info = AutoReset(env).step(key, state, action, params)
    plain_obs, _, plain_reward, plain_terminated, _, _ = env.step(jax.random.split(key)[0], state, action, params)
    reset_obs, reset_state = env.reset(jax.random.split(key)[1], params)
    assert bool(terminated) and bool(plain_terminated) and not bool(truncated)
    assert float(reward) == float(plain_reward) == 0.0
    np.testing.assert_array_equal(info["final_observation"], plain_obs)
    np.testing.assert_array_equal(obs, reset_obs)
    jax.tree.map(np.testing.assert_array_equal, new_state, reset_state)
    assert int(new_state.t) == 0


def test_autoreset_leaves_running_episodes_alone(env):
    params = env.default_params
    _, state = env.reset(KEY, params)
    key = jax.random.key(3)
    out = AutoReset(env).step(key, state, jnp.int32(0), params)
    plain = env.step(jax.random.split(key)[0], state, jnp.int32(0), params)
    if not bool(plain[3] | plain[4]):
        jax.tree.map(np.testing.assert_array_equal, out[1], plain[1])
        np.testing.assert_array_equal(out[0], plain[0])


@pytest.mark.parametrize("max_resets", [None, 1])  # 1 forces the reset-everything fallback
def test_vmap_autoreset_equals_vmapped_autoreset(env, max_resets):
    params = env.pretrain_params()
    num_envs = 64
    batched = VmapAutoReset(env, num_envs, max_resets)
    single = AutoReset(env)

    def rollout(step_fn, key):
        obs, states = batched.reset(jax.random.split(key, num_envs), params)

        def body(states, k):
            keys = jax.random.split(k, num_envs)
            actions = jax.random.randint(k, (num_envs,), 0, 4)
            obs, states, reward, terminated, truncated, info = step_fn(keys, states, actions)
            return states, (obs, reward, terminated, truncated, info["final_observation"], info["progress"])

        return jax.lax.scan(body, states, jax.random.split(key, 60))

    fast = jax.jit(lambda k: rollout(lambda *a: batched.step(*a, params), k))(KEY)
    reference = jax.jit(lambda k: rollout(lambda ks, s, a: jax.vmap(single.step, (0, 0, 0, None))(ks, s, a, params), k))(KEY)
    jax.tree.map(np.testing.assert_array_equal, fast, reference)
    assert int(jnp.sum(fast[1][2])) > 60  # many episodes ended, so resets were exercised


def test_vmap_autoreset_rejects_bad_capacity(env):
    with pytest.raises(ValueError, match="max_resets"):
        VmapAutoReset(env, 8, max_resets=9)


def test_episode_stats_report_return_and_length(env):
    params = env.task_params(["A-B-C"], [0])
    state = about_to_fail(env, params)
    wrapped = EpisodeStats(env)
    _, stats_state = wrapped.reset(KEY, params)
    stats_state = stats_state.replace(env_state=state)
    action = jnp.int32(1 if state.agent % 7 < 6 else 3)
    *_, info = wrapped.step(KEY, stats_state, action, params)
    assert int(info["episode_length"]) == 1 and float(info["episode_return"]) == 0.0
