"""Contrastive goal-conditioned RL: the loss, the energy, hindsight relabelling, the residual
network, the goal environments, the pure update under jit and vmap, and a real run of `hrl crl`
with TensorBoard, checkpoints and an exact resume."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import envs
from envs.goals import PinpadProgressGoal
from envs.grid_goal import GridGoal
from hrl import cli
from hrl.algos import crl
from hrl.experiment import ExperimentConfig
from hrl.infra.checkpoint import Checkpointer
from hrl.infra.config import ConfigError, load_config
from hrl.infra.metrics import read_metrics
from hrl.models.resnet import ResidualMLP, ResNetConfig, dense_layer_count

TINY_NET = ResNetConfig(depth=4, width=16)
TINY = crl.CRLConfig(num_envs=8, unroll_length=4, updates_per_iteration=2, batch_size=16, num_iterations=4,
                     iterations_per_chunk=2, buffer_steps=64, prefill_steps=8, representation_dim=8,
                     sa_encoder=TINY_NET, goal_encoder=TINY_NET, actor=TINY_NET, eval_episodes=8)
GOAL_ENV = GridGoal(horizon=20)


# --- the critic's loss and energy


def test_infonce_loss_matches_hand_computed_logits():
    logits = jnp.array([[2.0, 0.0, -1.0], [1.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    loss, metrics = crl.infonce_loss(logits, logsumexp_penalty=0.1)
    lse = [math.log(math.exp(2) + 1 + math.exp(-1)), math.log(math.e + math.exp(3) + 1), math.log(3)]
    infonce = np.mean([lse[0] - 2.0, lse[1] - 3.0, lse[2] - 0.0])
    penalty = 0.1 * np.mean(np.square(lse))
    np.testing.assert_allclose(metrics["critic/infonce"], infonce, rtol=1e-6)
    np.testing.assert_allclose(metrics["critic/logsumexp_penalty"], penalty, rtol=1e-6)
    np.testing.assert_allclose(loss, infonce + penalty, rtol=1e-6)
    np.testing.assert_allclose(metrics["critic/accuracy"], 2 / 3)  # row 2 is a tie, argmax picks column 0
    np.testing.assert_allclose(metrics["critic/logits_positive"], 5 / 3)
    np.testing.assert_allclose(metrics["critic/logits_negative"], 0.0)


def test_energy_is_minus_the_distance_and_its_gradient_is_finite_when_goal_equals_state():
    phi, psi = jnp.array([1.0, 2.0, 2.0]), jnp.zeros(3)
    np.testing.assert_allclose(crl.energy(phi, psi, 1e-6), -3.0, rtol=1e-6)
    same = jnp.array([0.3, -1.2, 0.5])
    grad_phi, grad_psi = jax.grad(crl.energy, argnums=(0, 1))(same, same, 1e-6)
    assert np.all(np.isfinite(grad_phi)) and np.all(np.isfinite(grad_psi))
    np.testing.assert_array_equal(grad_phi, 0.0)
    # Without the epsilon the same gradient is NaN: the reason for it.
    assert np.all(np.isnan(jax.grad(crl.energy)(same, same, 0.0)))
    # Through the whole critic loss, with psi(g) = phi(s, a) exactly: both encoders the same
    # network (same input size, same initial key) and each goal the state-action itself.
    coding = crl.ActionCoding(True, 2)
    critic = crl.Critic(4, 2, 6, TINY, nnx.Rngs(params=jax.random.key(0)))
    critic.sa_encoder = ResidualMLP(6, TINY.representation_dim, TINY_NET, nnx.Rngs(params=jax.random.key(1)))
    critic.goal_encoder = ResidualMLP(6, TINY.representation_dim, TINY_NET, nnx.Rngs(params=jax.random.key(1)))
    graphdef, params = nnx.split(critic)
    obs, actions = jax.random.normal(jax.random.key(2), (5, 4)), jnp.array([0, 1, 1, 0, 1])
    batch = crl.Transitions(obs, actions, jnp.concatenate([obs, coding.encode(actions)], -1), None, None)
    loss_and_grad = jax.jit(jax.value_and_grad(lambda p, b: crl.critic_loss(p, graphdef, b, coding, TINY), has_aux=True))
    (loss, metrics), grads = loss_and_grad(params, batch)
    np.testing.assert_allclose(metrics["critic/logits_positive"], -math.sqrt(TINY.energy_epsilon), rtol=1e-3)
    assert np.isfinite(loss) and all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(grads))


def test_squashed_gaussian_log_prob_is_the_change_of_variables():
    outputs = jnp.array([[0.3, -1.0, -2.0, 0.0]])  # means (0.3, -1), raw log-stds (-2, 0)
    action, log_pi = crl.squashed_gaussian_sample(outputs, jax.random.key(0))
    log_std = -5.0 + 0.5 * 7.0 * (np.tanh(np.array([-2.0, 0.0])) + 1)  # squashed into [-5, 2]
    pre_tanh = np.arctanh(np.asarray(action[0], np.float64))
    expected = np.sum(stats.norm.logpdf(pre_tanh, [0.3, -1.0], np.exp(log_std)) - np.log(1 - np.tanh(pre_tanh) ** 2))
    np.testing.assert_allclose(log_pi[0], expected, rtol=1e-3)
    # A huge raw log-std is capped at 2, and a saturated tanh still gives a finite log-probability.
    wide = jnp.array([[0.0, 50.0]])
    action, log_pi = crl.squashed_gaussian_sample(wide, jax.random.key(1))
    assert np.all(np.abs(action) <= 1) and np.isfinite(log_pi).all()


# --- the residual network


def test_residual_network_depth_counts_the_dense_layers_inside_its_blocks():
    for depth in (4, 8, 64):
        net = ResidualMLP(10, 3, ResNetConfig(depth=depth, width=8), nnx.Rngs(params=jax.random.key(0)))
        assert dense_layer_count(nnx.state(net)) == {"inside_blocks": depth, "total": depth + 2}
        kernels = nnx.state(net)["blocks"]["layers"][0]["dense"]["kernel"][...]
        assert kernels.shape == (depth // 4, 8, 8)  # depth / 4 blocks of 4 layers, stacked
        assert depth == 4 or not np.allclose(kernels[0], kernels[-1])  # blocks are initialised independently


def test_residual_block_adds_its_input_after_four_dense_layernorm_swish_layers():
    cfg = ResNetConfig(depth=4, width=6)
    net = ResidualMLP(5, 2, cfg, nnx.Rngs(params=jax.random.key(3)))
    x = jax.random.normal(jax.random.key(4), (7, 5))
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(net)))

    def dense_norm_swish(h, layer, index=None):
        pick = (lambda a: a[index]) if index is not None else (lambda a: a)
        h = h @ pick(layer["dense"]["kernel"]) + pick(layer["dense"]["bias"])
        h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
        h = h * pick(layer["norm"]["scale"]) + pick(layer["norm"]["bias"])
        return h / (1 + np.exp(-h))

    h = dense_norm_swish(np.asarray(x), params["input"])
    inner = h
    for i in range(4):
        inner = dense_norm_swish(inner, params["blocks"]["layers"][i], index=0)
    expected = (h + inner) @ params["head"]["kernel"] + params["head"]["bias"]
    np.testing.assert_allclose(net(x), expected, rtol=1e-4, atol=1e-5)


def test_network_configs_are_validated_with_the_full_key(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"crl.sa_encoder.depth: must be a positive multiple of 4, got 6"):
        load_config(ExperimentConfig, "gridworld/crl_goal_quick", ["crl.sa_encoder.depth=6"])
    with pytest.raises(ConfigError, match=r"crl.actor.activation: must be one of"):
        load_config(ExperimentConfig, "gridworld/crl_goal_quick", ["crl.actor.activation=tanh"])
    assert cli.main(["crl", "--runs-dir", str(tmp_path), "env.name=GridPinpad-v0"]) == 2
    assert "env.name: CRL needs a goal-reaching environment" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any work


# --- hindsight relabelling on a hand-filled trajectory buffer

MAX_EPISODE = 12


def hand_filled_buffer(capacity=48, num_envs=5, total_steps=150, unroll=4, seed=0):
    """Episodes of random lengths 1..12 per environment, written unroll by unroll (so the circular
    buffer wraps). Observations are (env, episode, step in episode); next goals (env, episode,
    step + 1), so a goal tells exactly which later state it came from."""
    rng = np.random.default_rng(seed)
    episode = np.zeros((total_steps, num_envs), np.int32)
    step = np.zeros((total_steps, num_envs), np.int32)
    lengths = {}
    for n in range(num_envs):
        ep, s, length = 0, 0, rng.integers(1, MAX_EPISODE + 1)
        for t in range(total_steps):
            episode[t, n], step[t, n] = ep, s
            lengths[n, ep] = length
            s += 1
            if s == length:
                ep, s, length = ep + 1, 0, rng.integers(1, MAX_EPISODE + 1)
    env_index = np.broadcast_to(np.arange(num_envs), (total_steps, num_envs))
    obs = np.stack([env_index, episode, step], -1).astype(np.float32)
    next_goals = np.stack([env_index, episode, step + 1], -1).astype(np.float32)
    buffer = crl.TrajectoryBuffer(
        obs=jnp.zeros((capacity, num_envs, 3)), actions=jnp.zeros((capacity, num_envs), jnp.int32),
        next_goals=jnp.zeros((capacity, num_envs, 3)), episode=jnp.full((capacity, num_envs), -1, jnp.int32),
        insert_at=jnp.int32(0), filled=jnp.int32(0))
    for start in range(0, total_steps, unroll):
        part = slice(start, start + unroll)
        buffer = crl.write_unroll(buffer, crl.Unroll(obs[part], jnp.zeros((unroll, num_envs), jnp.int32),
                                                     next_goals[part], episode[part], None, None))
    # Steps of each episode that were written (the newest episodes may be unfinished).
    written = {(n, ep): int(np.sum(episode[:, n] == ep)) for (n, ep) in lengths}
    return buffer, written


def test_relabelled_goals_come_from_later_in_the_same_episode():
    buffer, written = hand_filled_buffer()
    batch = jax.jit(crl.sample_transitions, static_argnums=(2, 3, 4))(buffer, jax.random.key(0), 4096, 0.9, MAX_EPISODE)
    obs, goals, k, steps_left = map(np.asarray, (batch.obs, batch.goals, batch.offsets, batch.steps_left))
    env, episode, step = obs.T.astype(int)
    oldest_kept = 150 - 48
    assert np.all(buffer.filled == 48) and len(set(map(tuple, obs))) > 150  # wrapped, well spread
    np.testing.assert_array_equal(goals[:, :2], obs[:, :2])  # same environment, same episode
    np.testing.assert_array_equal(goals[:, 2], step + k)  # the state k steps later
    expected_left = [written[n, ep] - s if (n, ep) in written else 0 for n, ep, s in zip(env, episode, step)]
    np.testing.assert_array_equal(steps_left, expected_left)  # up to the episode's last written state
    assert np.all((k >= 1) & (k <= steps_left)) and oldest_kept > 0


def test_relabelled_offsets_follow_the_truncated_geometric_law():
    """k given K (the steps left in the episode) must be P(k) = d^(k-1) (1 - d) / (1 - d^K): pooled
    over the sampled transitions' K, a chi-square test of the counts of k."""
    discount = 0.8  # spreads k over the 12 possible offsets; 0.99 is checked untruncated below
    buffer, _ = hand_filled_buffer(seed=1)
    batch = jax.jit(crl.sample_transitions, static_argnums=(2, 3, 4))(buffer, jax.random.key(1), 40000, discount, MAX_EPISODE)
    k, steps_left = np.asarray(batch.offsets), np.asarray(batch.steps_left)
    support = np.arange(1, MAX_EPISODE + 1)
    law = discount ** (support[None, :] - 1) * (1 - discount) / (1 - discount ** steps_left[:, None])
    law = np.where(support[None, :] <= steps_left[:, None], law, 0.0)
    expected = law.sum(0)
    observed = np.bincount(k, minlength=MAX_EPISODE + 1)[1:]
    bins = expected >= 5
    tail = ~bins
    observed = np.append(observed[bins], observed[tail].sum())
    expected = np.append(expected[bins], expected[tail].sum())
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_offsets_far_from_the_episode_end_are_geometric_with_the_papers_discount():
    steps_left = jnp.full((200_000,), 100_000)
    k = np.asarray(jax.jit(crl.truncated_geometric, static_argnums=1)(jax.random.key(2), 0.99, steps_left))
    assert k.min() >= 1
    edges = np.array([1, 5, 10, 25, 50, 100, 150, 200, 300, 400, 600])
    cdf = lambda upto: 1 - 0.99 ** (upto - 1)  # P(k < upto)
    expected = np.diff(np.append(cdf(edges), 1.0)) * k.size
    observed = np.diff(np.append(np.searchsorted(np.sort(k), edges), k.size))
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    assert abs(k.mean() - 100) < 1.5  # mean 1 / (1 - 0.99)


# --- goal environments


def test_grid_goal_reports_success_on_the_goal_cell_and_exposes_its_goal_space():
    from envs.grid_pinpad import distances_to, move

    env = envs.make("GridGoal-v0", horizon=30, solvable_only=True)
    obs, state = env.reset(jax.random.key(5), env.default_params)
    goal = env.desired_goal(state, env.default_params)
    assert obs.shape == env.observation_space.shape and goal.shape == env.goal_space.shape
    assert int(np.argmax(env.achieved_goal(obs))) == int(state.agent) != int(state.goal) == int(np.argmax(goal))
    walls = np.isin(np.arange(49), np.asarray(state.wall_cells))
    distance = np.asarray(distances_to(state.goal, jnp.asarray(walls)))
    assert int(env.shortest_path_length(state)) == distance[int(state.agent)] > 0
    for t in range(int(distance[int(state.agent)])):  # walk down the distance field
        action = min(range(4), key=lambda a: distance[int(move(state, jnp.int32(a)))])
        obs, state, reward, terminated, truncated, info = env.step(jax.random.key(0), state, action, env.default_params)
    assert bool(info["success"]) and bool(terminated) and float(reward) == 1.0 and not bool(truncated)
    np.testing.assert_array_equal(env.achieved_goal(obs), goal)


def test_pinpad_goal_appends_the_progress_count_and_asks_for_the_task_to_be_complete():
    from envs.experts import shortest_path_action

    env = envs.make("GridPinpadGoal-v0", horizon=100, solvable_only=True)
    assert isinstance(env, PinpadProgressGoal) and env.observation_space.shape == (637 + 13,)
    params = env.default_params
    assert int(params.tasks.ids[0]) == 16  # the post-training task
    obs, state = jax.jit(env.reset)(jax.random.key(0), params)
    np.testing.assert_array_equal(env.desired_goal(state, params), np.eye(13)[12])
    np.testing.assert_array_equal(obs[:637], env.env.observe(state, params))

    @jax.jit
    def expert_step(state, key):  # the shortest-path expert heads for colour 0, the task's first
        action, _ = shortest_path_action(key, state, params)
        obs, state, _, _, _, info = env.step(key, state, action, params)
        return obs, state, info["progress"]

    for t in range(100):
        obs, state, progress = expert_step(state, jax.random.key(t))
        if int(progress) >= 1:
            break
    assert int(progress) == 1
    np.testing.assert_array_equal(env.achieved_goal(obs), np.eye(13)[1])
    np.testing.assert_array_equal(env.observe(state, params), obs)


# --- the update and the training chunk


def stack(trees):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def random_batch(key, size=TINY.batch_size):
    """Transitions of GridGoal's shapes: binary observations, actions, one-hot goal cells."""
    obs_key, action_key, goal_key = jax.random.split(key, 3)
    obs = jax.random.bernoulli(obs_key, 0.05, (size, 98)).astype(jnp.uint8)
    goals = jax.nn.one_hot(jax.random.randint(goal_key, (size,), 0, 49), 49, dtype=jnp.uint8)
    return crl.Transitions(obs, jax.random.randint(action_key, (size,), 0, 4), goals, jnp.ones(size, jnp.int32),
                           jnp.ones(size, jnp.int32))


def test_the_whole_update_is_pure_jits_and_vmaps_over_seeds():
    update = crl.make_update(TINY, GOAL_ENV)
    learners = [crl.init_learner(jax.random.key(seed), TINY, GOAL_ENV) for seed in (0, 1)]
    batches = [random_batch(jax.random.key(seed)) for seed in (0, 1)]
    keys = [jax.random.key(10), jax.random.key(11)]
    one_by_one = [jax.jit(update)(*args) for args in zip(learners, batches, keys)]
    together = jax.jit(jax.vmap(update))(stack(learners), stack(batches), stack(keys))
    for seed, (learner, metrics) in enumerate(one_by_one):
        for a, b in zip(jax.tree.leaves((learner, metrics)), jax.tree.leaves(together), strict=True):
            np.testing.assert_allclose(a, b[seed], rtol=2e-5, atol=1e-6)
        assert all(np.isfinite(value) for value in jax.device_get(metrics).values())
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), learners[0].critic_params, one_by_one[0][0].critic_params)
    assert all(jax.tree.leaves(changed))  # every critic parameter moved
    assert float(one_by_one[0][0].log_alpha) != 0.0


# --- a real run of `hrl crl`: TensorBoard, metrics, checkpoints, an exact resume

TINY_RUN = [
    "run.experiment=tiny", "env.horizon=20", "env.solvable_only=false",
    "crl.num_envs=8", "crl.unroll_length=4", "crl.updates_per_iteration=2", "crl.batch_size=16",
    "crl.num_iterations=6", "crl.iterations_per_chunk=2", "crl.buffer_steps=64", "crl.prefill_steps=0",
    "crl.representation_dim=8", "crl.sa_encoder.width=16", "crl.goal_encoder.width=16", "crl.actor.width=16",
    "crl.eval_episodes=8", "loop.checkpoint_every=1", "loop.eval_every=2", "loop.progress=false",
]  # fmt: skip


def without_timing(records):
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "wall_time"} for r in records]


def final_state(run_path, step):
    config = load_config(ExperimentConfig, "gridworld/crl_goal_quick", TINY_RUN)
    env = config.env.make()
    like = jax.eval_shape(lambda: crl.init(jax.random.key(0), config.crl, env, env.default_params))
    with Checkpointer(run_path / "checkpoints") as checkpointer:
        assert checkpointer.latest_step() == step
        return checkpointer.restore_latest(like)[1]


def leaves(state):
    return [np.asarray(jax.random.key_data(leaf) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf)
            for leaf in jax.tree.leaves(state)]


def reuse_first_build(monkeypatch, module, name):
    """Make `module.name` return what its first call returned: the resumed run then reuses the
    first run's jitted functions (a fresh process would compile the very same programs; compiling
    them twice would double this test's time)."""
    real, built = getattr(module, name), []

    def once(*args, **kwargs):
        if not built:
            built.append(real(*args, **kwargs))
        return built[0]

    monkeypatch.setattr(module, name, once)


def test_hrl_crl_logs_checkpoints_and_resumes_exactly(tmp_path, capsys, monkeypatch):
    for name in ("init", "make_train_chunk", "make_evaluate"):
        reuse_first_build(monkeypatch, crl, name)
    runs = tmp_path / "runs"
    command = ["crl", "--preset", "gridworld/crl_goal_quick", "--runs-dir", str(runs), *TINY_RUN]
    assert cli.main(command) == 0
    run = runs / "tiny" / "crl" / "seed_0"
    assert "crl: done" in capsys.readouterr().out
    summary = json.loads((run / "complete").read_text())
    assert summary["env"] == "GridGoal-v0" and 0 <= summary["success_rate"] <= 1 and summary["episodes"] > 0

    records = read_metrics(run)
    assert [r["step"] for r in records] == [4, 8, 12]  # updates: 2 iterations x 2 updates per chunk
    assert [r["env_steps"] for r in records] == [64, 128, 192]
    assert records[0]["episodes"] <= records[1]["episodes"] <= records[2]["episodes"]
    assert [r["step"] for r in records if "eval/success_rate" in r] == [8, 12]  # every 2 chunks and the last
    events = EventAccumulator(str(run))
    events.Reload()
    for tag in ("critic/infonce", "actor/entropy", "episodes", "eval/success_rate", "eval/greedy_success_rate"):
        assert tag in events.Tags()["scalars"]

    # Lose the last chunk (as a kill after checkpoint 8 would), run again: the same numbers.
    finished = tmp_path / "finished"
    shutil.copytree(run, finished)
    (run / "complete").unlink()
    shutil.rmtree(run / "checkpoints" / "12")
    assert cli.main(command) == 0
    assert without_timing(read_metrics(run)) == without_timing(records)
    state = final_state(run, 12)
    for a, b in zip(leaves(final_state(finished, 12)), leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)

    # The final state: 3 chunks x 2 iterations x 4 steps (no prefill), in time order.
    assert int(state.updates) == 12 and int(state.env_steps) == 192
    filled = 3 * 2 * 4
    assert int(state.buffer.filled) == int(state.buffer.insert_at) == filled
    episode = np.asarray(state.buffer.episode)
    assert np.all(episode[filled:] == -1) and np.all(np.diff(episode[:filled], axis=0) >= 0)
    assert np.all(np.isin(np.asarray(state.collector.episode) - episode[filled - 1], [0, 1]))  # numbering goes on
