"""Supervised controllers: they learn, start as the base model bitwise, switch with the subgoal, and
the stage runs through the CLI and makes its figure."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from envs.grid_pinpad import GridPinpad
from hrl import cli
from hrl.algos import controllers
from hrl.analysis.figures import write_figures
from hrl.experiment import TRANSITIONS_FILE, ExperimentConfig, controller_episodes
from hrl.infra.config import ConfigError, load_config
from hrl.infra.rundir import RunDir
from hrl.models import rollout
from hrl.models.heads import Categorical
from hrl.models.transformer import Output
from conftest import host_copy

ENV = GridPinpad(horizon=40)  # the tiny pipeline's environment (uniform layouts, horizon 40)
NUM_SUBGOALS = 4


def test_controllers_learn_and_leave_the_base_model_bitwise_unchanged(clean_data, base):
    before = host_copy(nnx.state(base))
    cfg = controllers.ControllerConfig(learning_rate=1e-2, batch_size=8, num_updates=40, updates_per_chunk=10)
    layers = cfg.swept_layers(base.num_layers)
    assert layers == (0, 1)
    state = controllers.init(jax.random.key(2), cfg, base, len(layers), NUM_SUBGOALS)
    # The train state holds the controllers alone (A, B: [layers, subgoals, width, rank]).
    assert {leaf.shape for leaf in jax.tree.leaves(state.params)} == {(2, 4, 16, 16)}
    assert {leaf.shape for leaf in jax.tree.leaves(state.opt_state)} <= {(2, 4, 16, 16), (2,)}

    train_chunk = controllers.make_train_chunk(cfg, base, layers, controllers.dataset_episodes(clean_data, cfg.batch_size))
    history = []
    for _ in range(cfg.num_chunks):
        state, metrics = train_chunk(state)
        history.append(jax.device_get(metrics))
    for layer in layers:
        assert history[-1][f"action_nll/layer_{layer}"] < history[0][f"action_nll/layer_{layer}"]
        assert history[-1][f"action_nll/layer_{layer}"] < 0.95 * history[-1]["base_action_nll"]
        assert history[-1][f"subgoal_start_nll/layer_{layer}"] < history[-1]["base_subgoal_start_nll"]
    jax.tree.map(np.testing.assert_array_equal, host_copy(nnx.state(base)), before)


def test_counterfactual_controllers_learn_the_moves_to_every_next_subgoal(base):
    from envs.experts import make_expert, make_subgoal_start_labeller

    before = host_copy(nnx.state(base))
    sample = controllers.online_episodes(ENV, ENV.pretrain_params(), make_expert(ENV, 0.0), 8,
                                         make_subgoal_start_labeller(ENV))
    heldout = jax.jit(sample)(jax.random.key(99))
    assert heldout.counterfactual.moves.shape == (8, ENV.max_steps, NUM_SUBGOALS, 4)
    layers = (0,)

    def trained_counterfactual_nll(weight):
        cfg = controllers.ControllerConfig(learning_rate=3e-2, batch_size=8, num_updates=100, updates_per_chunk=100,
                                           data="online", counterfactual_weight=weight)
        state = controllers.init(jax.random.key(2), cfg, base, len(layers), NUM_SUBGOALS)
        state, metrics = controllers.make_train_chunk(cfg, base, layers, sample)(state)
        nll = controllers.counterfactual_nll(base, state.module(), 0, 0, base(heldout.obs).residuals[0], heldout)
        return float(nll), jax.device_get(metrics)

    # The tiny base model predicts little (action NLL 1.33 nats, uniform: 1.39): small margins.
    with_term, metrics = trained_counterfactual_nll(1.0)
    without_term, metrics_without = trained_counterfactual_nll(0.0)
    assert with_term < without_term - 0.01
    assert "counterfactual_nll/layer_0" in metrics and "counterfactual_nll/layer_0" not in metrics_without
    jax.tree.map(np.testing.assert_array_equal, host_copy(nnx.state(base)), before)


def test_own_episodes_are_the_steered_models_labelled_at_their_states_and_train_only_through_them(base):
    from envs import grid_pinpad
    from envs.experts import make_expert

    before = host_copy(nnx.state(base))
    layers = (0, 1)
    # A labeller that reads the state (the agent's cell and the ground-truth subgoal) shows each
    # label sits in the row of that state's observation and subgoal.
    read_state = lambda key, state, params: (state.agent, ENV.subgoal(state, params))
    sample_own = controllers.own_steered_episodes(ENV, ENV.pretrain_params(), read_state, 8, base, layers)
    fresh = controllers.init(jax.random.key(2), controllers.ControllerConfig(), base, len(layers), NUM_SUBGOALS)
    own = jax.device_get(jax.jit(sample_own)(jax.random.key(99), fresh.module()))
    labelled_cell, labelled_subgoal = own.actions
    assert own.obs.shape[:3] == labelled_cell.shape == own.subgoals.shape == (2, 8, ENV.max_steps)
    lengths = own.mask.sum(-1)
    assert (lengths >= 1).all() and (lengths > 1).any()
    np.testing.assert_array_equal(own.mask, np.arange(ENV.max_steps) < lengths[..., None])  # each a prefix
    observed_cell = own.obs.reshape(*own.obs.shape[:3], -1, grid_pinpad.NUM_CHANNELS)[..., -1].argmax(-1)
    np.testing.assert_array_equal(labelled_cell[own.mask], observed_cell[own.mask])
    np.testing.assert_array_equal(labelled_subgoal[own.mask], own.subgoals[own.mask])
    assert ((own.subgoals >= 0) & (own.subgoals < NUM_SUBGOALS))[own.mask].all()

    # With D*'s rows masked out, the own episodes (labelled by the clean expert) alone move the
    # controllers; without them nothing does.
    expert = make_expert(ENV, 0.0)
    dstar = controllers.online_episodes(ENV, ENV.pretrain_params(), expert, 8)
    no_dstar = lambda key: dstar(key)._replace(mask=jnp.zeros((8, ENV.max_steps), bool))
    cfg = controllers.ControllerConfig(learning_rate=3e-2, weight_decay=0.0, batch_size=8, num_updates=20,
                                       updates_per_chunk=20, data="online", own_episodes=8)
    untrained = controllers.init(jax.random.key(2), cfg, base, len(layers), NUM_SUBGOALS)
    sample_own = controllers.own_steered_episodes(ENV, ENV.pretrain_params(), expert, 8, base, layers)
    trained, metrics = controllers.make_train_chunk(cfg, base, layers, no_dstar, sample_own=sample_own)(untrained)
    unchanged, metrics_without = controllers.make_train_chunk(cfg, base, layers, no_dstar)(untrained)
    assert all(not np.array_equal(after, start) for after, start in
               zip(jax.tree.leaves(trained.params["b"]), jax.tree.leaves(untrained.params["b"])))
    jax.tree.map(np.testing.assert_array_equal, unchanged.params, untrained.params)
    for layer in layers:
        assert float(metrics[f"action_nll/layer_{layer}"]) == 0.0  # no D* step counted
        assert 0 < float(metrics[f"own_action_nll/layer_{layer}"]) < np.log(4) + 0.1
        assert f"own_action_nll/layer_{layer}" not in metrics_without
    jax.tree.map(np.testing.assert_array_equal, host_copy(nnx.state(base)), before)
    with pytest.raises(ConfigError, match="controllers.own_episodes"):  # the ant: refused before any work
        load_config(ExperimentConfig, "ant/quick", ["controllers.own_episodes=2"])


def test_counterfactual_labels_need_online_grid_data():
    with pytest.raises(ValueError, match="counterfactual_weight"):
        controllers.ControllerConfig(counterfactual_weight=1.0, data="dataset").validate()
    with pytest.raises(ConfigError, match="controllers.counterfactual_weight"):  # the ant: refused before any work
        load_config(ExperimentConfig, "ant/quick", ["controllers.counterfactual_weight=1", "controllers.data=online"])


def test_each_controller_sets_learning_rate_decays_to_the_final_fraction():
    cfg = controllers.ControllerConfig(learning_rate=1e-3, final_lr_fraction=0.1, weight_decay=0.0, num_updates=100)
    params = {"u": jnp.ones((2, 3))}  # two controller sets, each optimised on its own
    optimizer = controllers.make_optimizer(cfg)
    state = optimizer.init(params)
    sizes = []
    for _ in range(100):
        updates, state = optimizer.update({"u": jnp.ones((2, 3))}, state, params)  # Adam: steps of size ~lr
        sizes.append(np.abs(updates["u"][:, 0]))
    np.testing.assert_allclose(sizes[0], [1e-3, 1e-3], rtol=1e-2)
    np.testing.assert_allclose(sizes[-1], [1e-4, 1e-4], rtol=5e-2)
    with pytest.raises(ValueError, match="final_lr_fraction"):
        controllers.ControllerConfig(final_lr_fraction=0.0).validate()


def test_subgoal_starts_mark_each_episodes_first_step_and_every_change_of_subgoal():
    subgoals = jnp.array([[2, 2, 0, 0, 3, 3], [1, 1, 1, 1, 1, 1]])
    mask = jnp.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], bool)
    np.testing.assert_array_equal(controllers.subgoal_starts(subgoals, mask),
                                  [[1, 0, 1, 0, 1, 0], [1, 0, 0, 0, 0, 0]])


def test_online_batches_are_fresh_clean_expert_episodes_with_their_subgoals():
    from envs.experts import make_expert

    sample = jax.jit(controllers.online_episodes(ENV, ENV.pretrain_params(), make_expert(ENV, 0.0), 6))
    obs, actions, subgoals, mask, counterfactual = sample(jax.random.key(0))
    assert counterfactual is None  # only with a labeller (counterfactual_weight)
    assert obs.shape == (6, ENV.max_steps, ENV.observation_space.shape[0]) and actions.shape == mask.shape == (6, 40)
    assert not np.array_equal(obs, sample(jax.random.key(1))[0])
    valid = np.asarray(subgoals)[np.asarray(mask)]
    assert set(valid.tolist()) <= {0, 1, 2, 3} and len(set(valid.tolist())) > 1
    # Each episode starts on the first subgoal of a pretraining task, one of the four.
    assert set(np.asarray(subgoals)[:, 0].tolist()) <= {0, 1, 2, 3}


@pytest.mark.parametrize("rank", [16, 0])
def test_fresh_controllers_are_bitwise_the_base_model(clean_data, base, rank):
    # Op by op, as in test_transformer.py: two differently fused jitted programs may round differently.
    cfg = controllers.ControllerConfig(rank=rank)
    fresh = controllers.init(jax.random.key(3), cfg, base, 2, NUM_SUBGOALS).module()
    obs, subgoals = clean_data.obs[:4], clean_data.subgoals[:4]
    unsteered = base(obs)
    for logits in controllers.steered_action_logits(base, fresh, (0, 1), unsteered.residuals, subgoals):
        np.testing.assert_array_equal(logits, unsteered.action_params)


def test_fresh_controllers_give_the_base_models_closed_loop_episodes(base):
    fresh = controllers.init(jax.random.key(4), controllers.ControllerConfig(), base, 2, NUM_SUBGOALS).module()
    posttrain, keys = ENV.posttrain_params(), jax.random.split(jax.random.key(5), 8)
    steer = functools.partial(fresh.steer, 1)
    steered = jax.jit(jax.vmap(lambda k: rollout.run_episode(base, ENV, posttrain, k, steer=steer, layer=1)))(keys)
    unsteered = jax.jit(jax.vmap(lambda k: rollout.run_episode(base, ENV, posttrain, k)))(keys)
    for field in ("success", "progress", "length"):
        np.testing.assert_array_equal(getattr(steered, field), getattr(unsteered, field))


# A scripted check of the switching: an environment whose subgoal follows a fixed schedule, and a
# "model" whose action is whichever of 4 entries the intervention raised in an all-ones residual.
SCHEDULE = jnp.array([2, 2, 0, 0, 0, 3, 1, 1, 1])  # subgoal at time t: reset, then after each step


class ScheduledSubgoalEnv:
    max_steps = 8

    def reset(self, key, params):
        return jnp.zeros(1), jnp.int32(0)  # the state is the time step

    def subgoal(self, t, params):
        return SCHEDULE[t]

    def step(self, key, t, action, params):
        info = {"success": jnp.bool_(False), "progress": jnp.int32(0)}
        return jnp.zeros(1), t + 1, 0.0, jnp.bool_(False), t + 1 >= self.max_steps, info


class ActsOnRaisedEntry:
    action_dist = Categorical(4)

    def init_cache(self):
        return {}

    def step(self, cache, obs, intervention, layer):
        e = intervention(jnp.ones((1, 4)))
        return Output(action_params=100.0 * e[0], obs_params=obs), cache, e[0]


def test_the_steered_episode_applies_the_controller_of_the_current_subgoal():
    steering = controllers.LinearControllers(1, NUM_SUBGOALS, 4, rank=0, rngs=nnx.Rngs(0))
    goals = jnp.arange(NUM_SUBGOALS)
    steering.u[...] = jnp.zeros((1, 4, 4, 4)).at[0, goals, goals, 0].set(1.0)  # U_g e raises entry g
    episode = rollout.run_episode(
        ActsOnRaisedEntry(), ScheduledSubgoalEnv(), None, jax.random.key(0), steer=functools.partial(steering.steer, 0),
        layer=0, watch=lambda t, action, next_t: action,
    )
    np.testing.assert_array_equal(episode.watched, SCHEDULE[:8])  # each step steered by its subgoal's U_g
    assert int(episode.length) == 8


def test_the_oracle_learns_from_the_post_training_tasks_expert(pretrained_runs):
    runs, tiny = pretrained_runs
    config = load_config(ExperimentConfig, "gridworld/quick", tiny)
    for oracle, first_subgoals in ((True, {0}), (False, {0, 1, 2, 3})):
        sample = jax.jit(controller_episodes(config, runs, ENV, oracle=oracle))
        batch = jax.device_get(sample(jax.random.key(0)))
        subgoals, mask = batch.subgoals, batch.mask
        assert set(subgoals[:, 0].tolist()) <= first_subgoals
        transitions = {(int(a), int(b)) for row, valid in zip(subgoals, mask)
                       for a, b in zip(row[valid][:-1], row[valid][1:]) if a != b}
        if oracle:  # A-B-C-D-A-B: only its own transitions, and A -> B, which no pretraining task has
            assert (0, 1) in transitions and transitions <= {(0, 1), (1, 2), (2, 3), (3, 0)}
        else:
            assert (0, 1) not in transitions


def test_controllers_stage_through_the_cli_and_the_figures(runs_copy, capsys):
    runs, tiny = runs_copy
    for oracle in ([], ["--oracle"]):
        assert cli.main(["controllers", *oracle, "--runs-dir", str(runs), *tiny, "controllers.layers=[1]"]) == 0
        stage = "controllers_oracle" if oracle else "controllers"
        summary = RunDir(runs / "tiny" / stage / "seed_0").summary()
        for tasks in ("posttrain", "pretrain"):
            assert set(summary[f"{tasks}_success_by_layer"]) == {"1"}
            assert all(0 <= value <= 1 for value in summary[f"{tasks}_success_by_layer"].values())
        assert 0 <= summary["base_posttrain_success"] <= 1
        for kind in ("seen", "unseen"):
            assert set(summary[f"{kind}_transition_success_by_layer"]) == {"1"}
        pairs = json.loads((runs / "tiny" / stage / "seed_0" / TRANSITIONS_FILE).read_text())
        assert set(pairs) == {"1"} and len(pairs["1"]) == 12 and all(0 <= v <= 1 for v in pairs["1"].values())
        assert f"{stage}: done" in capsys.readouterr().out

    figures = write_figures(runs, "tiny", [0, 1])  # no probe run here, and no seed 1: left out with notes
    assert figures == [runs / "tiny" / "figures" / "controller_layer_sweep.png"]
    assert figures[0].stat().st_size > 0
    notes = capsys.readouterr().out
    assert "probe_accuracy_figure skipped: no complete 'probe' run" in notes
    assert "'controllers' is not complete for seeds [1]" in notes


def test_transition_pairs_are_every_ordered_pair_and_the_post_training_tasks_are_unseen():
    pairs, seen = controllers.transition_pairs(ENV)
    assert len(pairs) == 12 and len(set(pairs)) == 12 and all(x != y for x, y in pairs)
    assert {pair for pair, known in zip(pairs, seen) if not known} == {(0, 1), (1, 2), (2, 3), (3, 0)}


def test_transition_evaluation_is_each_pairs_chained_episodes(base):
    cfg = controllers.ControllerConfig(eval_episodes=6)
    state = controllers.init(jax.random.key(4), cfg, base, 1, NUM_SUBGOALS)
    b = state.params["b"]  # nonzero controllers, so that steering matters
    state = state.replace(params={**state.params, "b": jax.random.normal(jax.random.key(5), b.shape) * 0.3})
    key = jax.random.key(6)
    metrics = jax.device_get(controllers.make_evaluate_transitions(cfg, base, (1,), ENV, key)(state))
    steer = functools.partial(state.module().steer, 0)
    run = jax.jit(lambda params, keys: jax.vmap(
        lambda k: rollout.run_episode(base, ENV, params, k, steer=steer, layer=1))(keys))
    pairs, _ = controllers.transition_pairs(ENV)
    for index, pair in enumerate(pairs):
        episodes = run(ENV.subgoal_task_params(pair), jax.random.split(key, cfg.eval_episodes))
        assert metrics["transition_success/layer_1"][index] == pytest.approx(float(episodes.success.mean()))
        assert metrics["transition_progress/layer_1"][index] == pytest.approx(float(episodes.progress.mean()))
    assert metrics["transition_progress/layer_1"].max() > 0  # the check compares episodes that went somewhere
    summary = controllers.summarise_transitions(ENV, (1,), metrics)
    assert set(summary["pairs"]["1"]) == {f"{x}->{y}" for x, y in pairs}
    unseen = [summary["pairs"]["1"][name] for name in ("0->1", "1->2", "2->3", "3->0")]
    assert summary["unseen"]["1"] == pytest.approx(np.mean(unseen))
