"""Expert datasets: reproducible, consistent with the environment, and saved losslessly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs.experts import make_expert
from envs.grid_pinpad import GridPinpad
from hrl.data.expert import CollectConfig, collect, load_dataset, rollout_expert, save_dataset

ENV = GridPinpad(solvable_only=True)
PARAMS = ENV.pretrain_params()


@pytest.fixture(scope="module")
def clean():
    return collect(ENV, PARAMS, make_expert(ENV, 0.0), jax.random.key(0), num_episodes=48, episodes_per_batch=32)


def test_clean_dataset_shapes_and_success(clean):
    assert clean.obs.shape == (48, 100, 637) and clean.obs.dtype == np.uint8
    assert clean.actions.shape == clean.mask.shape == clean.subgoals.shape == (48, 100)
    assert clean.success.all()  # solvable layouts and no noise: the expert always finishes
    np.testing.assert_array_equal(clean.mask.sum(1), clean.lengths)
    assert all(clean.mask[i, : clean.lengths[i]].all() for i in range(48))  # valid steps come first
    assert set(np.unique(clean.task_ids)) <= set(range(16))
    assert set(np.unique(clean.subgoals[clean.mask])) <= {0, 1, 2, 3}


def test_same_key_same_dataset(clean):
    again = collect(ENV, PARAMS, make_expert(ENV, 0.0), jax.random.key(0), num_episodes=48, episodes_per_batch=32)
    jax.tree.map(np.testing.assert_array_equal, clean, again)


def test_replaying_the_actions_reproduces_observations_and_labels(clean):
    """The recorded observations, subgoal labels and success follow from the actions."""
    reset, step, subgoal = jax.jit(ENV.reset), jax.jit(ENV.step), jax.jit(ENV.subgoal)
    for i in range(4):
        key = jax.random.split(jax.random.fold_in(jax.random.key(0), 0), 32)[i]
        obs, state = reset(jax.random.split(key)[0], PARAMS)
        for t in range(int(clean.lengths[i])):
            np.testing.assert_array_equal(obs, clean.obs[i, t])
            assert int(subgoal(state, PARAMS)) == clean.subgoals[i, t]
            obs, state, reward, terminated, *_ = step(key, state, jnp.int32(clean.actions[i, t]), PARAMS)
        assert bool(terminated) and float(reward) == 1.0


def test_noisy_dataset_takes_longer_but_mostly_succeeds(clean):
    noisy = collect(ENV, PARAMS, make_expert(ENV, 0.5), jax.random.key(0), num_episodes=32, episodes_per_batch=32)
    assert noisy.lengths.mean() > 1.3 * clean.lengths.mean()
    assert noisy.success.mean() > 0.5


def test_save_and_load_round_trip(clean, tmp_path):
    save_dataset(clean, tmp_path / "D.npz")
    loaded = load_dataset(tmp_path / "D.npz")
    jax.tree.map(np.testing.assert_array_equal, clean, loaded)
    assert not list(tmp_path.glob("*.tmp*"))


def test_rollout_masks_steps_after_the_end():
    episode = jax.jit(lambda k: rollout_expert(ENV, PARAMS, make_expert(ENV, 0.0), k))(jax.random.key(5))
    length = int(episode.lengths)
    assert 0 < length < 100 and not episode.mask[length:].any()


@pytest.mark.parametrize("field, value", [("num_episodes", 0), ("epsilon", 1.5), ("episodes_per_batch", -1)])
def test_collect_config_validation(field, value):
    config = CollectConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        config.validate()
