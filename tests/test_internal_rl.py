"""Internal RL and the raw-action GRPO baseline: the shared objective on hand-computed cases, the
abstract-action environment under jit and vmap, switching exactly at the threshold, the training
rollout against the abstract steps, frozen parts untouched, and learning on a bandit."""

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from envs.grid_pinpad import GridPinpad
from hrl.algos import grpo, internal_rl
from hrl.infra.objectives import clipped_surrogate, epochs_of_minibatches, zscore
from hrl.models.metacontroller import Metacontroller, MetacontrollerConfig
from conftest import host_copy

ENV = GridPinpad(horizon=40)  # the tiny pipeline's environment
LAYER = 1


# --- the objective


def test_batch_zscoring_on_hand_computed_returns():
    np.testing.assert_allclose(zscore(jnp.array([1.0, 0.0, 0.0, 1.0])), np.array([1, -1, -1, 1]) * 0.5 / 0.501, rtol=1e-6)
    np.testing.assert_array_equal(zscore(jnp.zeros(8)), np.zeros(8))  # all failed: no signal, no NaN
    np.testing.assert_array_equal(zscore(jnp.ones(4)), np.zeros(4))
    # Two groups of two: each against its own mean.
    np.testing.assert_allclose(zscore(jnp.array([1.0, 0.0, 1.0, 1.0]), groups=2), [0.5 / 0.501, -0.5 / 0.501, 0, 0],
                               rtol=1e-6)


def test_clipped_surrogate_on_hand_computed_cases():
    ratios = jnp.array([1.5, 0.5, 0.5, 1.5, 3.0])
    advantages = jnp.array([1.0, 1.0, -1.0, -1.0, 5.0])
    mask = jnp.array([True, True, True, True, False])  # the last is padding
    objective, stats = clipped_surrogate(jnp.log(ratios), jnp.zeros(5), advantages, mask, 0.2)
    # min(r A, clip(r) A): 1.2 (clipped), 0.5, -0.8 (clipped), -1.5.
    np.testing.assert_allclose(objective, (1.2 + 0.5 - 0.8 - 1.5) / 4, rtol=1e-6)
    assert float(stats["clip_fraction"]) == 1.0


# --- the abstract-action environment


@pytest.fixture(scope="module")
def metacontroller(base):
    return Metacontroller(MetacontrollerConfig(), base.cfg.width, rngs=nnx.Rngs(params=jax.random.key(5)))


def abstract_env(base, meta, threshold=0.5):
    return internal_rl.AbstractActionEnv(ENV, ENV.posttrain_params(), base, meta, LAYER, threshold)


@pytest.fixture(scope="module")
def threshold(base, metacontroller):
    """A threshold that the untrained gate crosses at some raw steps and not at others."""
    env = abstract_env(base, metacontroller)
    _, state = env.reset(jax.random.key(0))
    raw_step = jax.jit(env.raw_step)
    betas = []
    for _ in range(20):
        betas.append(float(state.beta))
        state, _ = raw_step(state, jnp.ones(8))
    return float(np.median(betas))


def test_an_abstract_step_ends_exactly_where_beta_crosses_the_threshold(base, metacontroller, threshold):
    env = abstract_env(base, metacontroller, threshold)
    step, raw_step = jax.jit(env.step), jax.jit(env.raw_step)
    _, state = env.reset(jax.random.key(0))
    z = jnp.full(8, 0.3)
    for _ in range(4):
        _, after, _, done = step(state, z)
        # The same raw steps one at a time: the abstract step must stop at the first crossing.
        probe, _ = raw_step(state, z)
        raw_steps = 1
        while not bool(probe.done) and float(probe.beta) < threshold:
            probe, _ = raw_step(probe, z)
            raw_steps += 1
        assert int(after.t) - int(state.t) == raw_steps
        assert bool(done) or float(after.beta) >= threshold
        state = after
        if bool(done):
            break


def test_abstract_steps_under_jit_and_vmap_equal_single_episodes(base, metacontroller, threshold):
    env = abstract_env(base, metacontroller, threshold)
    keys = jax.random.split(jax.random.key(1), 3)
    zs = jax.random.normal(jax.random.key(2), (3, 8))

    def two_steps(key, z):
        _, state = env.reset(key)
        e, state, reward, _ = env.step(state, z)
        e, state, reward2, done = env.step(state, -z)
        return e, state.t, reward + reward2, done

    batched = jax.jit(jax.vmap(two_steps))(keys, zs)
    for i in range(3):
        single = jax.jit(two_steps)(keys[i], zs[i])
        for b, s in zip(batched, single):
            np.testing.assert_allclose(b[i], s, rtol=1e-5, atol=1e-5)


def test_the_training_rollout_equals_the_abstract_steps(base, metacontroller, threshold):
    """The raw-step scan that training uses makes the same episode as stepping the abstract-action
    environment with the same latents."""
    env = abstract_env(base, metacontroller, threshold)
    policy = internal_rl.AbstractPolicy(base.cfg.width, 8, 16, rngs=nnx.Rngs(params=jax.random.key(3)))
    run = jax.jit(lambda k: internal_rl.rollout(env, policy, k))
    # An episode with several abstract steps, some longer than one raw step (many end at once on a wrong colour).
    for key in jax.random.split(jax.random.key(4), 20):
        episode = run(key)
        decisions = int(episode.decisions.mask.sum())
        if decisions >= 2 and int(episode.length) > decisions:
            break
    else:
        pytest.fail("no episode with several abstract steps")

    env_key, _ = jax.random.split(key)
    e, state = env.reset(env_key)
    step = jax.jit(env.step)
    for k in range(decisions):
        np.testing.assert_allclose(e, episode.decisions.e[k], rtol=1e-5, atol=1e-5)
        e, state, _, done = step(state, episode.decisions.z[k])
    assert bool(done)
    assert int(state.t) == int(episode.length) and bool(state.success) == bool(episode.success)


def test_beta_one_switches_at_every_raw_step(base):
    meta = Metacontroller(MetacontrollerConfig(), base.cfg.width, rngs=nnx.Rngs(params=jax.random.key(5)),
                          always_switch=True)
    env = abstract_env(base, meta)
    policy = internal_rl.AbstractPolicy(base.cfg.width, 8, 16, rngs=nnx.Rngs(params=jax.random.key(3)))
    episode = jax.jit(lambda k: internal_rl.rollout(env, policy, k))(jax.random.key(6))
    assert int(episode.decisions.mask.sum()) == int(episode.length)


# --- the policy and its update


def test_the_policy_starts_at_the_prior_and_the_update_sees_the_rollouts_probabilities(base, metacontroller, threshold):
    env = abstract_env(base, metacontroller, threshold)
    cfg = internal_rl.InternalRLConfig(policy_width=16)
    state = internal_rl.init(jax.random.key(0), cfg, env)
    policy = state.module()
    mean, log_std = policy(jnp.ones((5, base.cfg.width)))
    np.testing.assert_array_equal(mean, 0.0)
    np.testing.assert_array_equal(log_std, 0.0)
    # Train the head a little so the check below is not trivially about a constant policy.
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), state.params)
    policy = nnx.merge(state.graphdef, params)
    episodes = jax.jit(jax.vmap(lambda k: internal_rl.rollout(env, policy, k)))(jax.random.split(jax.random.key(2), 4))
    _, stats = internal_rl.policy_loss(cfg, state.graphdef, params, (episodes.decisions, jnp.ones(4)))
    # The sequence form recomputes what the step form sampled with: ratio 1 before any update.
    assert float(stats["approx_kl"]) < 1e-6 and float(stats["clip_fraction"]) == 0.0


def test_the_update_raises_the_probability_of_the_rewarded_latent():
    """A bandit: one decision per episode, reward 1 when z_0 > 0. The clipped update on z-scored
    returns must move the policy's mean of z_0 up."""
    cfg = internal_rl.InternalRLConfig(policy_width=8, learning_rate=3e-2, epochs=2, minibatches=2)
    policy = internal_rl.AbstractPolicy(4, 2, 8, rngs=nnx.Rngs(params=jax.random.key(0)))
    graphdef, params = nnx.split(policy)
    optimizer = internal_rl.make_optimizer(cfg)
    opt_state = optimizer.init(params)
    e = jnp.ones((64, 1, 4))

    def probability_of_reward(params):
        mean, log_std = jax.vmap(nnx.merge(graphdef, params))(e[:1])
        return float(jax.scipy.stats.norm.cdf(mean[0, 0, 0] / jnp.exp(log_std[0, 0, 0])))

    @jax.jit
    def update(params, opt_state, key):
        sample_key, update_key = jax.random.split(key)
        mean, log_std = jax.vmap(nnx.merge(graphdef, params))(e)
        z = mean + jnp.exp(log_std) * jax.random.normal(sample_key, mean.shape)
        decisions = internal_rl.Decisions(e, z, internal_rl.gaussian_log_prob(z, mean, log_std), jnp.ones((64, 1), bool))
        advantages = zscore((z[:, 0, 0] > 0).astype(jnp.float32))
        loss = lambda p, batch: internal_rl.policy_loss(cfg, graphdef, p, batch)  # noqa: E731
        return epochs_of_minibatches(loss, optimizer, params, opt_state, (decisions, advantages), update_key,
                                     cfg.epochs, cfg.minibatches)[:2]

    start = probability_of_reward(params)
    for i in range(5):
        params, opt_state = update(params, opt_state, jax.random.key(i))
    assert start == pytest.approx(0.5)
    assert probability_of_reward(params) > 0.7


def test_training_changes_only_the_policy(base, metacontroller, threshold):
    # Any single subgoal completes the task, so that the tiny base model succeeds now and then.
    params = ENV.task_params(["A", "B", "C", "D"], [0, 1, 2, 3], any_task=True)
    env = internal_rl.AbstractActionEnv(ENV, params, base, metacontroller, LAYER, threshold)
    cfg = internal_rl.InternalRLConfig(policy_width=16, batch_size=64, minibatches=2, updates_per_chunk=2,
                                       learning_rate=1e-2, eval_episodes=4)
    frozen = host_copy((nnx.state(base), nnx.state(metacontroller)))
    state = internal_rl.init(jax.random.key(0), cfg, env)
    before = host_copy(state.params)
    state, metrics = internal_rl.make_train_chunk(cfg, env)(state)
    assert int(metrics["episodes"]) == 128
    assert metrics["success_rate"] > 0  # some signal: the advantages are not all zero
    assert metrics["decisions_per_episode"] >= 1
    assert set(internal_rl.make_evaluate(cfg, env, jax.random.key(1))(state)) == {
        "success_rate", "decisions_per_episode", "greedy_success_rate", "greedy_decisions_per_episode"}
    jax.tree.map(np.testing.assert_array_equal, host_copy((nnx.state(base), nnx.state(metacontroller))), frozen)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), before, host_copy(state.params)))
    assert any(changed)


# --- GRPO


def test_grpo_rollout_probabilities_match_the_full_pass_and_groups_share_layouts(base):
    keys = jax.random.split(jax.random.key(0), 2)
    run = jax.jit(jax.vmap(lambda r, a: grpo.rollout(base, ENV, ENV.posttrain_params(), r, a)))
    episodes = run(jnp.stack([keys[0], keys[0]]), keys)
    first_obs = episodes.obs[:, 0]
    np.testing.assert_array_equal(first_obs[0], first_obs[1])  # same reset key, same layout
    log_probs = jax.nn.log_softmax(base(episodes.obs).action_params)
    recomputed = jnp.take_along_axis(log_probs, episodes.actions[..., None], -1)[..., 0]
    np.testing.assert_allclose(jnp.where(episodes.mask, recomputed, 0), jnp.where(episodes.mask, episodes.log_prob, 0),
                               atol=1e-5)


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_grpo_trains_a_copy_and_leaves_the_reference_alone(base, kl_coef):
    cfg = grpo.GRPOConfig(batch_size=64, group_size=4, kl_coef=kl_coef, updates_per_chunk=2, learning_rate=1e-2)
    params = ENV.task_params(["A", "B", "C", "D"], [0, 1, 2, 3], any_task=True)  # successes now and then
    reference = host_copy(nnx.state(base))
    state = grpo.init(jax.random.key(0), cfg, base)
    state, metrics = grpo.make_train_chunk(cfg, base, ENV, params)(state)
    assert int(metrics["episodes"]) == 128
    assert metrics["success_rate"] > 0
    assert ("kl_to_reference" in metrics) == bool(kl_coef)
    jax.tree.map(np.testing.assert_array_equal, host_copy(nnx.state(base)), reference)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), reference, host_copy(state.params)))
    assert any(changed)


# --- the stages


def test_the_pipeline_runs_every_stage_then_skips_them_all(runs_copy, capsys):
    from hrl import cli
    from hrl.infra.rundir import RunDir

    runs, tiny = runs_copy
    command = ["pipeline", "gridworld", "--runs-dir", str(runs), "--seeds", "0", *tiny]
    assert cli.main(command) == 0
    for stage in ("internal_rl", "internal_rl_beta1", "internal_rl_cotrained", "grpo"):
        summary = RunDir(runs / "tiny" / stage / "seed_0").summary()
        assert summary["episodes"] == 16 and 0 <= summary["eval_success_rate"] <= 1
    assert (runs / "tiny" / "figures" / "rl_success.png").is_file()
    assert "## internal_rl" in (runs / "tiny" / "results.md").read_text()
    capsys.readouterr()
    assert cli.main(command) == 0  # a second run finds every stage complete
    out = capsys.readouterr().out
    assert "done (" not in out.replace("pipeline: done", "")
    assert out.count("complete, skipped") >= 12


def test_seeds_trained_in_one_vmapped_program_match_seeds_trained_alone(runs_copy):
    """Discovery and GRPO on two seeds, each with its own base model, together; then seed 1 alone:
    the same run directories up to float rounding. (Internal RL goes through the same
    `train_seeds`; it passed this test too, and is left out for time: its compiles are the slowest.)"""
    from hrl.experiment import ExperimentConfig, run_collect, run_discovery, run_grpo, run_pretrain, with_seed
    from hrl.infra.config import load_config
    from hrl.infra.metrics import read_metrics

    runs, tiny = runs_copy
    config = load_config(ExperimentConfig, "gridworld/quick", [*tiny, "grpo.updates_per_chunk=2"])
    run_collect(with_seed(config, 1), runs)
    run_pretrain(with_seed(config, 1), runs)
    alone = runs.parent / "alone"
    shutil.copytree(runs, alone)

    together = run_discovery(config, runs, seeds=[0, 1]) + run_grpo(config, runs, seeds=[0, 1])
    run_discovery(with_seed(config, 1), alone)
    run_grpo(with_seed(config, 1), alone)
    for seed_0, seed_1 in (together[:2], together[2:]):
        mine, single = read_metrics(seed_1.path), read_metrics(alone / seed_1.path.relative_to(runs))
        assert [r["step"] for r in mine] == [r["step"] for r in single] and mine
        assert set(mine[-1]) - {"time/compile_s"} == set(single[-1]) - {"time/compile_s"}
        for name in (name for name in single[-1] if not name.startswith("time/")):
            np.testing.assert_allclose([r.get(name, 0) for r in mine], [r.get(name, 0) for r in single],
                                       rtol=1e-4, atol=1e-5, err_msg=f"{seed_1.path}: {name}")
        curve = lambda records: [r.get("episode_length", r.get("loss/alpha_0")) for r in records]  # noqa: E731
        assert curve(read_metrics(seed_0.path)) != curve(mine)  # seed 0 is another run
    path = Path("tiny") / "discovery" / "seed_1" / "analysis.npz"
    with np.load(runs / path) as mine, np.load(alone / path) as single:
        steps = single["beta"].shape[-1]  # together, D* is cut after the longest episode of both seeds
        np.testing.assert_allclose(mine["beta"][..., :steps], single["beta"], rtol=1e-4, atol=1e-5)
        assert not mine["beta"][..., steps:].any()
