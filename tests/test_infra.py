"""Run directories, checkpoints, metrics and the host loop, on a toy regression problem."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hrl.infra.checkpoint import Checkpointer
from hrl.infra.config import ConfigError
from hrl.infra.loop import LoopConfig, NonFiniteMetricError, run_training, run_training_seeds, stack_seeds, vmap_seeds
from hrl.infra.metrics import read_metrics
from hrl.infra.rundir import ConfigMismatchError, RunDir

# ----------------------------------------------------------------------------------------------
# A toy algorithm with the shape of a real one: a pytree state holding params, optax state and a
# key, and a jitted chunk of updates in lax.scan that draws all its randomness from that key.

TRUE_WEIGHTS = jnp.array([1.0, -2.0, 0.5])
OPTIMIZER = optax.adamw(0.1)


@struct.dataclass
class ToyState:
    params: dict
    opt_state: optax.OptState
    key: jax.Array
    updates: jax.Array


def toy_init(seed: int) -> ToyState:
    params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    return ToyState(params, OPTIMIZER.init(params), jax.random.key(seed), jnp.int32(0))


def toy_loss(params, x, y):
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


@jax.jit
def toy_train_chunk(state: ToyState):
    def update(state, _):
        key, batch_key = jax.random.split(state.key)
        x = jax.random.normal(batch_key, (16, 3))
        loss, grads = jax.value_and_grad(toy_loss)(state.params, x, x @ TRUE_WEIGHTS + 0.3)
        updates, opt_state = OPTIMIZER.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return ToyState(params, opt_state, key, state.updates + 1), loss

    state, losses = jax.lax.scan(update, state, length=5)
    return state, {"loss": losses.mean(), "loss_last": losses[-1]}


def toy_evaluate(state: ToyState):
    return {"weight_error": jnp.abs(state.params["w"] - TRUE_WEIGHTS).sum()}


QUIET = LoopConfig(checkpoint_every=2, keep_checkpoints=2, eval_every=3, progress=False)


def train_toy(run_path, num_chunks, loop=QUIET, train_chunk=toy_train_chunk):
    run = RunDir.open(run_path, {"toy": {"seed": 0}})
    return run_training(run, toy_init(0), train_chunk, num_chunks, steps_per_chunk=5, loop=loop,
                        evaluate=toy_evaluate)


def tensorboard_scalars(run_path):
    accumulator = EventAccumulator(str(run_path))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def assert_trees_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------------------------
# Run directories


def test_rundir_resumes_same_config_and_refuses_a_different_one(tmp_path):
    path = RunDir.path_for(tmp_path, "exp", "bc", seed=3)
    assert path == tmp_path / "exp" / "bc" / "seed_3"
    run = RunDir.open(path, {"bc": {"learning_rate": 0.001, "hidden": [8, 8]}})
    assert (path / "config.yaml").is_file() and not run.is_complete

    RunDir.open(path, {"bc": {"learning_rate": 0.001, "hidden": [8, 8]}})  # same config: resume
    with pytest.raises(ConfigMismatchError, match=r"bc\.learning_rate: 0\.001 -> 0\.01") as refused:
        RunDir.open(path, {"bc": {"learning_rate": 0.01, "hidden": [8, 8]}})
    assert isinstance(refused.value, ConfigError)  # the CLI prints it as a user error

    run.mark_complete({"loss": 0.5})
    assert RunDir(path).is_complete and RunDir(path).summary() == {"loss": 0.5}
    fresh = RunDir.open(path, {"bc": {"learning_rate": 0.01, "hidden": [8, 8]}}, overwrite=True)
    assert not fresh.is_complete and fresh.saved_config() == {"bc": {"learning_rate": 0.01, "hidden": [8, 8]}}


def test_a_key_added_to_the_schema_since_reads_as_its_default(tmp_path):
    from hrl.infra.loop import LoopConfig as Section  # any config dataclass with defaults

    path = tmp_path / "run"
    RunDir.open(path, {"loop": Section()})
    saved = (path / "config.yaml").read_text()
    (path / "config.yaml").write_text("\n".join(line for line in saved.splitlines() if "eval_every" not in line))
    RunDir.open(path, {"loop": Section()})  # eval_every did not exist then: its default now
    with pytest.raises(ConfigMismatchError, match=r"loop\.eval_every: 10 -> 3"):
        RunDir.open(path, {"loop": Section(eval_every=3)})


# ----------------------------------------------------------------------------------------------
# Checkpoints


def trained_toy_state():
    state, _ = toy_train_chunk(toy_init(7))
    return state


def test_checkpoint_round_trip_is_bitwise_with_optimizer_state_and_keys(tmp_path):
    state = {"toy": trained_toy_state(), "raw_key": jax.random.PRNGKey(5), "counter": jnp.uint8(3)}
    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        assert checkpointer.restore_latest(state) is None
        checkpointer.save(40, state)
    with Checkpointer(tmp_path / "ckpt") as checkpointer:  # a fresh process would do the same
        step, restored = checkpointer.restore_latest(jax.eval_shape(lambda: state))
    assert step == 40
    assert_trees_bitwise_equal(restored, state)
    assert jnp.issubdtype(restored["toy"].key.dtype, jax.dtypes.prng_key)
    assert isinstance(restored["toy"].opt_state[0], optax.ScaleByAdamState)


def test_checkpointer_keeps_last_n(tmp_path):
    state = trained_toy_state()
    with Checkpointer(tmp_path, keep_last=2) as checkpointer:
        for step in (5, 10, 15, 20):
            checkpointer.save(step, state)
        assert checkpointer.all_steps() == [15, 20]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["15", "20"]


KILLED_SAVER = textwrap.dedent("""
    import sys, jax.numpy as jnp
    from hrl.infra.checkpoint import Checkpointer
    with Checkpointer(sys.argv[1], keep_last=5) as checkpointer:
        for step in range(1, 1000):
            # 3 x 16 MB, every element equal to the step: a torn checkpoint would show.
            checkpointer.save(step, {name: jnp.full((4_000_000,), step, jnp.float32) for name in "abc"})
            print(step, flush=True)
""")


def test_kill_during_save_never_leaves_a_restorable_torn_checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    saver = subprocess.Popen([sys.executable, "-c", KILLED_SAVER, str(directory)], stdout=subprocess.PIPE, text=True)
    try:
        assert saver.stdout.readline().strip() == "1"  # one complete checkpoint exists
        deadline = time.monotonic() + 60
        while not any(".orbax-checkpoint-tmp" in p.name for p in directory.iterdir()):  # the next save is under way
            assert time.monotonic() < deadline, "no save in progress was ever seen"
        saver.send_signal(signal.SIGKILL)
    finally:
        saver.kill()
        saver.wait()
    torn = [p for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    assert torn, "the kill should land during a save"
    torn_step = int(torn[0].name.split(".")[0])

    like = {name: jnp.zeros((4_000_000,), jnp.float32) for name in "abc"}
    with Checkpointer(directory) as checkpointer:
        step, restored = checkpointer.restore_latest(like)
        assert step == torn_step - 1
        for array in restored.values():
            assert bool((array == step).all())
    assert not any(".orbax-checkpoint-tmp" in p.name for p in directory.iterdir())  # cleaned up on open


# ----------------------------------------------------------------------------------------------
# The host loop


def test_loop_logs_checkpoints_and_summarises(tmp_path):
    result = train_toy(tmp_path / "run", num_chunks=6)

    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert records[-1]["loss"] < records[0]["loss"] / 4
    assert [r["step"] for r in records if "eval/weight_error" in r] == [15, 30]
    assert "time/compile_s" in records[0] and all("time/chunk_s" in r for r in records)
    assert int(result.state.updates) == 30 and result.step == 30
    assert result.summary["metrics"]["loss"] == records[-1]["loss"]
    assert result.summary["compile_s"] > 0 and result.summary["run_s"] > 0

    assert Checkpointer(tmp_path / "run" / "checkpoints").all_steps() == [20, 30]
    scalars = tensorboard_scalars(tmp_path / "run")
    assert [step for step, _ in scalars["loss"]] == [5, 10, 15, 20, 25, 30]
    assert [value for _, value in scalars["loss"]] == pytest.approx([r["loss"] for r in records])
    assert [step for step, _ in scalars["eval/weight_error"]] == [15, 30]


class Interrupted(Exception):
    pass


def interrupt_at_update(limit):
    """The real toy chunk, but the process 'dies' when asked for a chunk starting at `limit` updates."""
    def train_chunk(state):
        if int(state.updates) >= limit:
            raise Interrupted
        return toy_train_chunk(state)
    return train_chunk


def test_resume_drops_metrics_after_the_checkpoint_and_matches_an_uninterrupted_run(tmp_path):
    straight = train_toy(tmp_path / "straight", num_chunks=6)

    # Dies before chunk 4: checkpoints at steps 10 and 20, chunk 3 (step 15) logged but not saved...
    with pytest.raises(Interrupted):
        train_toy(tmp_path / "resumed", num_chunks=6, train_chunk=interrupt_at_update(15))
    assert [r["step"] for r in read_metrics(tmp_path / "resumed")] == [5, 10, 15]
    # ...so the resume restarts from step 10 and must forget what it logged at step 15.
    resumed = train_toy(tmp_path / "resumed", num_chunks=6)
    assert resumed.summary["resumed_from_step"] == 10

    assert_trees_bitwise_equal(resumed.state, straight.state)
    drop_timing = lambda records: [{k: v for k, v in r.items() if not k.startswith("time") and k != "wall_time"}
                                   for r in records]
    assert drop_timing(read_metrics(tmp_path / "resumed")) == drop_timing(read_metrics(tmp_path / "straight"))
    resumed_scalars, straight_scalars = tensorboard_scalars(tmp_path / "resumed"), tensorboard_scalars(tmp_path / "straight")
    for tag in ("loss", "loss_last", "eval/weight_error"):
        assert resumed_scalars[tag] == straight_scalars[tag]  # no step shown twice, same values


def test_resume_of_a_finished_run_does_nothing_and_reports_the_final_metrics(tmp_path):
    first = train_toy(tmp_path / "run", num_chunks=4)
    again = train_toy(tmp_path / "run", num_chunks=4)
    assert again.summary["resumed_from_step"] == 20 and again.summary["metrics"] == first.summary["metrics"]
    assert_trees_bitwise_equal(again.state, first.state)
    assert len(read_metrics(tmp_path / "run")) == 4


def test_non_finite_metric_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    @jax.jit
    def explodes_after_15_updates(state):
        state, metrics = toy_train_chunk(state)
        return state, {**metrics, "loss": jnp.where(state.updates > 15, jnp.nan, metrics["loss"])}

    with pytest.raises(NonFiniteMetricError, match=r"non-finite metric at step 20: loss=nan.*last good checkpoint: step 10"):
        train_toy(tmp_path / "run", num_chunks=6, train_chunk=explodes_after_15_updates)
    assert Checkpointer(tmp_path / "run" / "checkpoints").all_steps() == [10]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [5, 10, 15]


# Several seeds in one vmapped program, one run directory each


def make_scaled_chunk(scale):
    """The toy chunk with a per-seed constant (as a frozen model would be): targets times `scale`."""
    def chunk(state):
        def update(state, _):
            key, batch_key = jax.random.split(state.key)
            x = jax.random.normal(batch_key, (16, 3))
            loss, grads = jax.value_and_grad(toy_loss)(state.params, x, scale * (x @ TRUE_WEIGHTS + 0.3))
            updates, opt_state = OPTIMIZER.update(grads, state.opt_state, state.params)
            return ToyState(optax.apply_updates(state.params, updates), opt_state, key, state.updates + 1), loss

        state, losses = jax.lax.scan(update, state, length=5)
        return state, {"loss": losses.mean()}
    return chunk


SCALES = jnp.array([1.0, 3.0])


def train_seeds(tmp_path, num_chunks, train_chunk=None):
    runs = [RunDir.open(tmp_path / f"seed_{seed}", {"toy": {"seed": seed}}) for seed in (0, 1)]
    states = stack_seeds([toy_init(0), toy_init(1)])
    return run_training_seeds(runs, states, train_chunk or vmap_seeds(make_scaled_chunk, SCALES), num_chunks,
                              steps_per_chunk=5, loop=QUIET, evaluate=jax.vmap(toy_evaluate))


def test_vmapped_seeds_log_and_checkpoint_each_seed_like_its_own_run(tmp_path):
    results = train_seeds(tmp_path / "together", num_chunks=4)
    for seed, result in enumerate(results):
        alone_run = RunDir.open(tmp_path / f"alone_{seed}", {"toy": {"seed": seed}})
        alone = run_training(alone_run, toy_init(seed), jax.jit(make_scaled_chunk(SCALES[seed])), 4,
                             steps_per_chunk=5, loop=QUIET, evaluate=toy_evaluate)
        together, single = read_metrics(tmp_path / "together" / f"seed_{seed}"), read_metrics(alone_run.path)
        assert [r["step"] for r in together] == [r["step"] for r in single] == [5, 10, 15, 20]
        assert [r["loss"] for r in together] == pytest.approx([r["loss"] for r in single], rel=1e-5)
        assert together[-1]["eval/weight_error"] == pytest.approx(single[-1]["eval/weight_error"], rel=1e-4, abs=1e-6)
        with Checkpointer(tmp_path / "together" / f"seed_{seed}" / "checkpoints") as checkpointer:
            step, restored = checkpointer.restore_latest(toy_init(seed))  # restores as a single-seed state
        assert step == 20
        assert_trees_bitwise_equal(restored, result.state)
        np.testing.assert_allclose(restored.params["w"], alone.state.params["w"], rtol=1e-5, atol=1e-6)
    assert results[0].summary["metrics"]["loss"] != results[1].summary["metrics"]["loss"]  # the seeds differ


def test_vmapped_seeds_resume_from_the_newest_step_every_seed_saved(tmp_path):
    straight = train_seeds(tmp_path / "straight", num_chunks=6)
    with pytest.raises(Interrupted):
        chunk = vmap_seeds(make_scaled_chunk, SCALES)
        train_seeds(tmp_path / "resumed", 6, lambda states: chunk(states) if int(states.updates[0]) < 25
                    else (_ for _ in ()).throw(Interrupted()))
    # Killed between the two seeds' saves at step 20: seed 1 only has step 10.
    Checkpointer(tmp_path / "resumed" / "seed_1" / "checkpoints").delete_after(10)
    resumed = train_seeds(tmp_path / "resumed", num_chunks=6)
    assert [result.summary["resumed_from_step"] for result in resumed] == [10, 10]
    for seed in (0, 1):
        assert_trees_bitwise_equal(resumed[seed].state, straight[seed].state)
        assert [r["step"] for r in read_metrics(tmp_path / "resumed" / f"seed_{seed}")] == [5, 10, 15, 20, 25, 30]


def test_loop_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"checkpoint_every: must be >= 1, got 0"):
        LoopConfig(checkpoint_every=0).validate()


def test_metrics_lines_are_json_objects_with_step(tmp_path):
    train_toy(tmp_path / "run", num_chunks=1)
    line = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0]
    record = json.loads(line)
    assert record["step"] == 5 and isinstance(record["loss"], float)
    assert os.path.isfile(tmp_path / "run" / "config.yaml")


def test_kernel_only_weight_decay_leaves_biases_norms_and_position_biases_alone():
    from flax import nnx

    from hrl.infra.train_state import adamw
    from hrl.models.transformer import Transformer, TransformerConfig

    cfg = TransformerConfig(num_layers=1, width=8, num_heads=2, mlp_width=8, max_len=4, relpos_init_slope=1.0)
    params = nnx.split(Transformer(cfg, 5, 3, rngs=nnx.Rngs(0)))[1]
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    for kernels_only in (True, False):
        optimizer = adamw(0.1, weight_decay=0.5, max_grad_norm=1.0, decay_kernels_only=kernels_only)
        updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
        decayed = nnx.to_pure_dict(jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates))
        block = decayed["blocks"][0]
        assert block["attention"]["qkv"]["kernel"] and decayed["action_head"]["kernel"]
        assert block["attention"]["relpos_bias"] != kernels_only
        assert block["mlp_norm"]["scale"] != kernels_only
