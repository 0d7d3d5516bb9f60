"""PPO (hrl/algos/ppo.py) and the ant expert's privileged view (envs/ant_pinpad.py): GAE against a
plain loop, the direction field against a plain breadth-first search on hand-made layouts, the
dense reward through the real physics, and PPO updates and training on a tiny point-mass task."""

from collections import deque
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from envs.ant_pinpad import AntBody, AntPinpadState, PrivilegedAntPinpad, direction_field, home_pose
from envs.base import Box, Env
from hrl.algos import ppo

KEY = jax.random.key(0)


# --- GAE


def gae_loop(rewards, values, next_values, terminated, truncated, gamma, lam):
    """The textbook recursion, one environment, plain Python."""
    advantages = np.zeros(len(rewards))
    following = 0.0
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * (1 - terminated[t]) * next_values[t] - values[t]
        done = terminated[t] or truncated[t]
        following = delta + gamma * lam * (0.0 if done else following)
        advantages[t] = following
    return advantages


def test_gae_matches_a_plain_loop_across_episode_ends():
    rng = np.random.default_rng(0)
    steps, envs = 40, 3
    rewards, values, next_values = (rng.normal(size=(steps, envs)).astype(np.float32) for _ in range(3))
    terminated = (rng.random((steps, envs)) < 0.1).astype(np.float32)
    truncated = ((rng.random((steps, envs)) < 0.1) & (terminated == 0)).astype(np.float32)
    advantages, returns = jax.jit(ppo.gae, static_argnums=(5, 6))(rewards, values, next_values, terminated,
                                                                  truncated, 0.97, 0.9)
    for env in range(envs):
        expected = gae_loop(rewards[:, env], values[:, env], next_values[:, env], terminated[:, env],
                            truncated[:, env], 0.97, 0.9)
        np.testing.assert_allclose(np.asarray(advantages[:, env]), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(returns), np.asarray(advantages) + values, rtol=1e-6)
    assert terminated.sum() > 0 and truncated.sum() > 0


def test_running_observation_statistics_match_numpy():
    data = np.random.default_rng(1).normal(3.0, 2.0, size=(5, 64, 4)).astype(np.float32)
    stats = ppo.init_obs_stats(4)
    for chunk in data:
        stats = ppo.update_obs_stats(stats, jnp.asarray(chunk))
    flat = data.reshape(-1, 4)
    np.testing.assert_allclose(np.asarray(stats.mean), flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(stats.m2) / (len(flat) - 1), flat.var(0, ddof=1), rtol=1e-4)


# --- the direction field on hand-made layouts

UP, RIGHT, DOWN, LEFT = 0, 1, 2, 3
MOVES = {UP: (-1, 0), RIGHT: (0, 1), DOWN: (1, 0), LEFT: (0, -1)}


def cell(row, col):
    return row * 4 + col


def layout_state(params, colours, wall, ant_cell, task=0, progress=0):
    qpos = home_pose()
    row, col = divmod(ant_cell, 4)
    qpos = qpos.at[:2].set(jnp.array([-3.0 + 2 * col, 3.0 - 2 * row]))  # the cell's centre
    return AntPinpadState(
        body=AntBody(qpos=qpos, qvel=jnp.zeros(14), warmstart=jnp.zeros(14)),
        cell=jnp.int32(ant_cell), colour_cells=jnp.asarray(colours, jnp.int32), wall_cells=jnp.asarray([wall], jnp.int32),
        task=jnp.int32(task), alive=jnp.arange(params.tasks.size) == task, progress=jnp.int32(progress), t=jnp.int32(0),
    )


def bfs_directions(colours, wall, target_colour):
    """Per cell, the set of optimal first moves towards the target colour (plain BFS), obstacles: the wall
    and the other colours."""
    target = colours[target_colour]
    blocked = {wall} | {c for i, c in enumerate(colours) if i != target_colour}
    dist = {target: 0}
    queue = deque([target])
    while queue:
        here = queue.popleft()
        r, c = divmod(here, 4)
        for dr, dc in MOVES.values():
            nr, nc = r + dr, c + dc
            there = cell(nr, nc)
            if 0 <= nr < 4 and 0 <= nc < 4 and there not in blocked and there not in dist:
                dist[there] = dist[here] + 1
                queue.append(there)
    optimal = {}
    for here in range(16):
        if here in blocked or here == target or here not in dist:
            optimal[here] = set()
            continue
        r, c = divmod(here, 4)
        optimal[here] = {m for m, (dr, dc) in MOVES.items()
                         if 0 <= r + dr < 4 and 0 <= c + dc < 4 and dist.get(cell(r + dr, c + dc)) == dist[here] - 1}
    return optimal


@pytest.fixture(scope="module")
def expert_env():
    return PrivilegedAntPinpad()


COLOURS = [cell(0, 0), cell(0, 1), cell(2, 0), cell(1, 3)]
WALL = cell(1, 1)


def test_direction_field_on_a_hand_made_layout(expert_env):
    params = expert_env.posttrain_params()  # 0-1-2-3
    field = jax.jit(direction_field)
    # Next colour 0 at (0, 0): reachable only through the start cell (1, 0), from below.
    first = np.asarray(field(layout_state(params, COLOURS, WALL, cell(1, 0)), params))
    assert first[cell(1, 0)].tolist() == [1, 0, 0, 0]  # up
    assert first.sum() == 1  # every other cell: the target, an obstacle, or cut off behind them
    # Next colour 3 at (1, 3), after 0, 1, 2 (progress 3): hand-checked cells.
    last = np.asarray(field(layout_state(params, COLOURS, WALL, cell(2, 0), progress=3), params))
    assert np.argmax(last[cell(1, 2)]) == RIGHT and np.argmax(last[cell(2, 3)]) == UP
    assert np.argmax(last[cell(0, 2)]) == RIGHT  # right and down tie: the first in up, right, down, left
    assert np.argmax(last[cell(3, 0)]) == RIGHT and last[cell(2, 0)].sum() == 0  # (2, 0) is colour 2: an obstacle
    assert last[WALL].sum() == 0 and last[cell(1, 3)].sum() == 0


def test_direction_field_follows_a_shortest_path_on_random_layouts(expert_env):
    params = expert_env.posttrain_params()
    field = jax.jit(direction_field)
    rng = np.random.default_rng(0)
    for _ in range(30):
        cells = rng.permutation(16)[:6].tolist()
        colours, wall, start = cells[1:5], cells[5], cells[0]
        progress = int(rng.integers(0, 4))
        got = np.asarray(field(layout_state(params, colours, wall, start, progress=progress), params))
        expected = bfs_directions(colours, wall, progress)  # the post-training task's colour k is k
        for here in range(16):
            if expected[here]:
                assert got[here].sum() == 1 and int(np.argmax(got[here])) == min(expected[here]), (colours, wall, here)
            else:
                assert got[here].sum() == 0, (colours, wall, here)


def test_privileged_observation_and_reward_through_the_physics(expert_env):
    params = expert_env.posttrain_params()
    state = layout_state(params, COLOURS, WALL, cell(1, 0))
    obs = expert_env.observe(state, params)
    assert obs.shape == expert_env.observation_space.shape == (105,)
    np.testing.assert_array_equal(np.asarray(obs[41:]).reshape(16, 4), np.asarray(direction_field(state, params)))
    step = jax.jit(expert_env.step)
    rewards = {}
    for name, vy in [("towards", 1.5), ("away", -1.5)]:  # the field says up in the start cell
        moving = state.replace(body=state.body.replace(qvel=state.body.qvel.at[1].set(vy)))
        _, after, reward, terminated, _, _ = step(KEY, moving, jnp.zeros(8), params)
        rewards[name] = float(reward)
        assert not bool(terminated) and int(after.cell) == cell(1, 0)
    assert rewards["towards"] > 0.5 and rewards["away"] < -0.5


# --- PPO on a tiny continuous task


@struct.dataclass
class PointState:
    x: jax.Array
    t: jax.Array


class PointMass(Env):
    """Steer a 2-D point to the origin: x' = x + 0.2 a, reward -|x'|, truncated after 16 steps."""

    name = "PointMass"
    horizon = 16

    @property
    def default_params(self) -> Any:
        return jnp.float32(0)

    @property
    def observation_space(self) -> Box:
        return Box(-10.0, 10.0, (2,))

    @property
    def action_space(self) -> Box:
        return Box(-1.0, 1.0, (2,))

    @property
    def max_steps(self) -> int:
        return self.horizon

    def observe(self, state, params):
        return state.x

    def reset(self, key, params):
        state = PointState(jax.random.uniform(key, (2,), minval=-2.0, maxval=2.0), jnp.int32(0))
        return state.x, state

    def step(self, key, state, action, params):
        x = state.x + 0.2 * jnp.clip(action, -1.0, 1.0)
        state = PointState(x, state.t + 1)
        info = {"success": jnp.linalg.norm(x) < 0.2, "subgoal": jnp.int32(0), "progress": jnp.int32(0),
                "task_id": jnp.int32(0)}
        return x, state, -jnp.linalg.norm(x), jnp.bool_(False), state.t >= self.horizon, info


TINY = ppo.PPOConfig(num_envs=16, unroll_length=16, num_minibatches=4, update_epochs=4, num_iterations=60,
                     iterations_per_chunk=20, learning_rate=3e-3, hidden=(32, 32), gamma=0.9, eval_episodes=32)


def test_one_jitted_update_reduces_the_loss():
    env = PointMass()
    state = ppo.init(KEY, TINY, env, env.default_params)
    _, _, steps = jax.jit(ppo.make_unroll(TINY, env, env.default_params))(state, KEY)
    next_values = ppo.nnx.merge(state.graphdef, state.params)(steps.final_obs)[2]
    advantages, returns = ppo.gae(steps.rewards, steps.values, next_values, steps.terminated, steps.truncated,
                                  TINY.gamma, TINY.gae_lambda)
    batch = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]),
                         ppo.Batch(steps.obs, steps.actions, steps.log_probs, advantages, returns))
    loss = jax.jit(lambda params: ppo.ppo_loss(params, state.graphdef, batch, TINY))
    before, before_metrics = loss(state.params)
    assert abs(float(before_metrics["policy/approx_kl"])) < 1e-6  # the stored log-probs are the policy's
    params, _, metrics = jax.jit(ppo.make_update(TINY, state.graphdef))(state.params, state.opt_state, batch, KEY)
    after, _ = loss(params)
    assert np.isfinite(float(metrics["loss/total"])) and float(after) < float(before) - 0.05


def test_training_improves_the_greedy_return_and_is_deterministic(tmp_path):
    env = PointMass()
    params = env.default_params
    evaluate = ppo.make_evaluate(TINY, env, params, jax.random.key(1))
    first = ppo.init(KEY, TINY, env, params)
    train_chunk = ppo.make_train_chunk(TINY, env, params, first.graphdef)
    state = first
    for _ in range(TINY.num_chunks):
        state, metrics = train_chunk(state)
    start, end = evaluate(first), evaluate(state)
    assert float(end["return"]) > float(start["return"]) + 3.0  # about -20 (random) to about -5
    assert int(state.env_steps) == TINY.num_iterations * TINY.env_steps_per_iteration
    again = ppo.init(KEY, TINY, env, params)
    for _ in range(TINY.num_chunks):
        again, _ = train_chunk(again)
    jax.tree.map(np.testing.assert_array_equal, state.params, again.params)

