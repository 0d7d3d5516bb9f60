"""Gymnasium 1.x adapters of gridworld-pinpad and of ant-pinpad ("hrl/AntPinpad-v0": see the section
at the end of this file), each as a single environment and as a batched vector one.

    import envs, gymnasium
    env = gymnasium.make("hrl/GridPinpad-v0", task="posttrain", solvable_only=True)
    vec = gymnasium.make_vec("hrl/GridPinpad-v0", num_envs=1024)
    ants = gymnasium.make_vec("hrl/AntPinpad-v0", num_envs=64)

Both run the pure JAX environment under `jax.jit` and return numpy arrays. They are for tools
that speak gymnasium; JAX training code should use the functional API (`envs.make`) directly, which
is much faster than any per-step host round trip.

Episode configuration (constructor keyword arguments, or `reset(options=...)` for one reset):
- task: "pretrain" (one of the 16 pretraining tasks, drawn per episode), "posttrain", a
  pretraining task index 0..15, or one of those tasks in subgoal letters ("A-C-B");
- any_task: with "pretrain", completing any pretraining task counts (how a model that cannot see
  the task is evaluated; a task is still drawn, and solvable_only keeps the layouts where it is doable);
- solvable_only: redraw layouts where the task cannot be done within the horizon.
A reset's options last until the next reset (in the vector environment they also apply to the
autoresets in between); a reset without options returns to the constructor's configuration.

Seeding: `reset(seed=s)` seeds gymnasium's `np_random`, and every reset draws its JAX key from
it, so the same seed gives the same trajectory and a reset without a seed continues the stream.

The vector environment autoresets in the same step (`AutoresetMode.SAME_STEP`, like
`envs.wrappers.AutoReset`): when an episode ends, `step` returns the first observation of the next
episode, with the reward, terminated and truncated of the step that ended the old one. As in
gymnasium's `SyncVectorEnv(autoreset_mode=SAME_STEP)`, `infos["final_obs"]` (an object array,
None where no episode ended) and `infos["final_info"]` then hold the ended episode's last
observation and info, masked by `infos["_final_obs"]` and `infos["_final_info"]`; the top-level
info of a reset environment describes its new episode.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any, Callable

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from envs import pinpad
from envs.grid_pinpad import OBS_DIM, GridPinpad, info as grid_info
from envs.render import render_state
from envs.wrappers import VmapAutoReset

NUM_ACTIONS = 4
RENDER_FPS = 4
INFO_KEYS = ("success", "subgoal", "progress", "task_id")


# --- episode configuration


@dataclass(frozen=True)
class EpisodeConfig:
    """What `reset` draws: see the module docstring."""

    task: str | int = "pretrain"
    any_task: bool = False
    solvable_only: bool = False

    def with_options(self, options: dict[str, Any] | None) -> "EpisodeConfig":
        options = dict(options or {})
        unknown = set(options) - set(self.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown reset option(s) {sorted(unknown)}; valid: {sorted(self.__dataclass_fields__)}"
            )
        for flag in ("any_task", "solvable_only"):
            if flag in options and not isinstance(options[flag], (bool, np.bool_)):
                raise ValueError(f"option {flag} must be a bool, got {options[flag]!r}")
        config = replace(self, **options)
        config.params()  # refuse a bad task now, not at the next step
        return config

    def params(self) -> pinpad.PinpadParams:
        """The task params (`any_task` matters only for the 'pretrain' set)."""
        if isinstance(self.task, str) and self.task in ("pretrain", "posttrain", pinpad.GRID_POSTTRAIN_TASK):
            return _task_params(self.task, bool(self.any_task))
        return _task_params(pretrain_task_index(self.task), False)


@functools.lru_cache(maxsize=None)
def _task_params(task: str | int, any_task: bool) -> pinpad.PinpadParams:
    # Cached: building params uploads small arrays, which would cost every reset a host round trip.
    env = GridPinpad()
    if task == "pretrain":
        return env.pretrain_params(any_task=any_task)
    if task in ("posttrain", pinpad.GRID_POSTTRAIN_TASK):
        return env.posttrain_params()
    return env.fixed_task_params(task)


def pretrain_task_index(task: str | int) -> int:
    """A pretraining task given by index or by subgoal letters, as its index in the table."""
    count = len(pinpad.GRID_PRETRAIN_TASKS)
    if isinstance(task, str) and task in pinpad.GRID_PRETRAIN_TASKS:
        return pinpad.GRID_PRETRAIN_TASKS.index(task)
    if isinstance(task, (int, np.integer)) and not isinstance(task, bool) and 0 <= task < count:
        return int(task)
    raise ValueError(
        f"invalid task {task!r}: use 'pretrain', 'posttrain', a pretraining task index 0..{count - 1}, "
        f"or one of the tasks {', '.join(pinpad.GRID_PRETRAIN_TASKS)} or {pinpad.GRID_POSTTRAIN_TASK}"
    )


# --- jitted functions: compiled once per configuration and shared by all instances


@functools.lru_cache(maxsize=None)
def _single_functions(env_class: type, info_of: Callable, horizon: int, solvable_only: bool):
    """The jitted reset (returning the first info too) and step of one `env_class` environment."""
    env = env_class(horizon=horizon, solvable_only=solvable_only)

    def reset(key, params):
        obs, state = env.reset(key, params)
        return obs, state, info_of(state, params, jnp.bool_(False))

    def step(key, state, action, params):
        key, key_step = jax.random.split(key)
        return key, *env.step(key_step, state, action, params)

    return jax.jit(reset), jax.jit(step)


@functools.lru_cache(maxsize=None)
def _vector_functions(env_class: type, info_of: Callable, horizon: int, solvable_only: bool, num_envs: int):
    """The jitted reset and step of `num_envs` `env_class` environments with same-step autoreset."""
    batched = VmapAutoReset(env_class(horizon=horizon, solvable_only=solvable_only), num_envs)
    first_info = jax.vmap(info_of, (0, None, None))

    def reset(key, params):
        obs, states = batched.reset(jax.random.split(key, num_envs), params)
        return obs, states, first_info(states, params, jnp.bool_(False))

    def step(key, states, actions, params):
        key, key_step = jax.random.split(key)
        obs, states, reward, terminated, truncated, info = batched.step(
            jax.random.split(key_step, num_envs), states, actions, params
        )
        final_obs = info.pop("final_observation")
        done = terminated | truncated
        top_info = jax.tree.map(lambda new, old: jnp.where(done, new, old), first_info(states, params, jnp.bool_(False)), info)
        return key, obs, states, reward, terminated, truncated, top_info, info, final_obs

    return jax.jit(reset), jax.jit(step)


def _to_host(tree):
    """Writable numpy copies (what device_get gives may be read-only views of device buffers, and
    users own what a step returns)."""
    return jax.tree.map(np.array, jax.device_get(tree))


def _check_render_mode(render_mode: str | None, supported: list[str]) -> None:
    if render_mode not in (None, *supported):
        raise ValueError(f"render_mode {render_mode!r} not supported; use one of {[None, *supported]}")


def _jax_key(np_random: np.random.Generator) -> jax.Array:
    return jax.random.key(int(np_random.integers(2**32, dtype=np.uint64)))


# --- actions


def _action_error(action, problem: str, valid: str) -> ValueError:
    return ValueError(f"invalid action {action!r}: {problem}; expected {valid}")


def _as_integer_array(actions, valid: str) -> np.ndarray:
    """`actions` as an int64 array, refusing non-numbers, booleans and non-integer floats."""
    try:
        array = np.asarray(actions)
    except Exception as err:  # objects numpy cannot convert at all
        raise _action_error(actions, f"not convertible to an array ({err})", valid) from None
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array) & (array == np.round(array))):
            raise _action_error(actions, "not an integer", valid)
    elif array.dtype.kind not in "iu":
        raise _action_error(actions, f"has type {type(actions).__name__} (dtype {array.dtype})", valid)
    return array.astype(np.int64)


def validate_action(action) -> int:
    """One action as an int in 0..3, or a ValueError naming it and the valid range."""
    valid = f"one integer in 0..{NUM_ACTIONS - 1} (Discrete({NUM_ACTIONS}): 0 up, 1 right, 2 down, 3 left)"
    array = _as_integer_array(action, valid)
    if array.shape != ():
        raise _action_error(action, f"has shape {array.shape}", valid)
    if not 0 <= array < NUM_ACTIONS:
        raise _action_error(action, "out of range", valid)
    return int(array)


def validate_actions(actions, num_envs: int) -> np.ndarray:
    """A batch of actions as int32 [num_envs] in 0..3, or a ValueError naming the bad entries."""
    valid = f"{num_envs} integers in 0..{NUM_ACTIONS - 1} (MultiDiscrete of Discrete({NUM_ACTIONS}))"
    array = _as_integer_array(actions, valid)
    if array.shape != (num_envs,):
        raise _action_error(actions, f"has shape {array.shape}", valid)
    bad = np.flatnonzero((array < 0) | (array >= NUM_ACTIONS))
    if bad.size:
        shown = ", ".join(f"[{i}]={array[i]}" for i in bad[:5])
        raise _action_error(actions, f"{bad.size} out of range ({shown}{', ...' if bad.size > 5 else ''})", valid)
    return array.astype(np.int32)


# --- the single environment


def _host_info(info) -> dict[str, Any]:
    return {"success": bool(info["success"]), **{k: int(info[k]) for k in INFO_KEYS[1:]}}


class _SingleEnv(gymnasium.Env):
    """One pure JAX pinpad behind gymnasium's API (no autoreset; `step` after the end is undefined,
    as in gymnasium). `state` and `params` expose the JAX episode, e.g. for an expert policy.
    Subclasses say which environment (`_functions`), which actions (`_validate`) and how to draw."""

    episode_config = EpisodeConfig

    def __init__(self, jax_env, render_mode: str | None, task, any_task: bool, solvable_only: bool):
        _check_render_mode(render_mode, self.metadata["render_modes"])
        self.render_mode = render_mode
        self.jax_env = jax_env
        self.default_config = self.episode_config().with_options(
            {"task": task, "any_task": any_task, "solvable_only": solvable_only}
        )
        self.state = None
        self.params = None
        self._key = None
        self._step = self._functions(False)[1]  # stepping never depends on solvable_only

    def _functions(self, solvable_only: bool):
        """The jitted (reset, step) of `_single_functions` for this environment."""
        raise NotImplementedError

    def _validate(self, action):
        raise NotImplementedError

    def _on_new_state(self, first: bool) -> None:
        """Called after every reset (first=True) and step; for what rendering keeps."""

    def _draw(self):
        raise NotImplementedError

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        config = self.default_config.with_options(options)
        self.params = config.params()
        self._key, key_reset = jax.random.split(_jax_key(self.np_random))
        obs, self.state, info = self._functions(config.solvable_only)[0](key_reset, self.params)
        self._on_new_state(first=True)
        obs, info = _to_host((obs, info))
        return obs, _host_info(info)

    def step(self, action):
        if self.state is None:
            raise gymnasium.error.ResetNeeded("call reset() before step()")
        action = self._validate(action)
        self._key, obs, self.state, reward, terminated, truncated, info = self._step(
            self._key, self.state, action, self.params
        )
        self._on_new_state(first=False)
        obs, reward, terminated, truncated, info = _to_host((obs, reward, terminated, truncated, info))
        return obs, float(reward), bool(terminated), bool(truncated), _host_info(info)

    def render(self):
        if self.render_mode is None:
            gymnasium.logger.warn("render() called without a render_mode; make the env with render_mode='rgb_array'")
            return None
        if self.state is None:
            raise gymnasium.error.ResetNeeded("call reset() before render()")
        return self._draw()


class GridPinpadGymEnv(_SingleEnv):
    """gridworld-pinpad as a `gymnasium.Env`."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": RENDER_FPS}

    def __init__(
        self,
        render_mode: str | None = None,
        task: str | int = "pretrain",
        any_task: bool = False,
        solvable_only: bool = False,
        horizon: int = 100,
    ):
        super().__init__(GridPinpad(horizon=horizon), render_mode, task, any_task, solvable_only)
        self.observation_space = spaces.Box(0, 1, (OBS_DIM,), np.uint8)
        self.action_space = spaces.Discrete(NUM_ACTIONS)

    def _functions(self, solvable_only: bool):
        return _single_functions(GridPinpad, grid_info, self.jax_env.horizon, solvable_only)

    def _validate(self, action):
        return np.int32(validate_action(action))

    def _draw(self):
        return render_state(jax.device_get(self.state), jax.device_get(self.params))


# --- the vector environment


def _with_masks(info: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    """gymnasium's vector info layout: each key beside a `_key` mask of the envs that report it."""
    return {**info, **{f"_{key}": mask.copy() for key in info}}


class _VectorEnv(gymnasium.vector.VectorEnv):
    """`num_envs` pure JAX pinpads stepped together in one jitted call, with same-step autoreset
    (see the module docstring) through `envs.wrappers.VmapAutoReset`. Subclasses say which
    environment (`_functions`), which actions (`_validate`) and how to draw one state."""

    episode_config = EpisodeConfig

    def __init__(self, jax_env, num_envs: int, render_mode: str | None, task, any_task: bool, solvable_only: bool,
                 single_observation_space: spaces.Space, single_action_space: spaces.Space):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        _check_render_mode(render_mode, self.metadata["render_modes"])
        self.num_envs = num_envs
        self.render_mode = render_mode
        self.jax_env = jax_env
        self.default_config = self.episode_config().with_options(
            {"task": task, "any_task": any_task, "solvable_only": solvable_only}
        )
        self.single_observation_space = single_observation_space
        self.single_action_space = single_action_space
        self.observation_space = batch_space(single_observation_space, num_envs)
        self.action_space = batch_space(single_action_space, num_envs)
        self.states = None
        self.params = None
        self.config = self.default_config
        self._key = None

    def _functions(self):
        """The jitted (reset, step) of `_vector_functions` for this environment."""
        raise NotImplementedError

    def _validate(self, actions):
        raise NotImplementedError

    def _draw(self, state, params):
        raise NotImplementedError

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.config = self.default_config.with_options(options)
        self.params = self.config.params()
        self._key, key_reset = jax.random.split(_jax_key(self.np_random))
        obs, self.states, info = self._functions()[0](key_reset, self.params)
        obs, info = _to_host((obs, info))
        return obs, _with_masks(info, np.ones(self.num_envs, bool))

    def step(self, actions):
        if self.states is None:
            raise gymnasium.error.ResetNeeded("call reset() before step()")
        actions = self._validate(actions)
        self._key, obs, self.states, *outputs = self._functions()[1](self._key, self.states, actions, self.params)
        obs, reward, terminated, truncated, info, final_info, final_obs = _to_host((obs, *outputs))
        infos = _with_masks(info, np.ones(self.num_envs, bool))
        done = terminated | truncated
        if done.any():
            infos["final_obs"] = np.full(self.num_envs, None, dtype=object)
            for i in np.flatnonzero(done):
                infos["final_obs"][i] = final_obs[i]
            infos["_final_obs"] = done.copy()
            infos["final_info"] = _with_masks(final_info, done)
            infos["_final_info"] = done.copy()
        return obs, reward.astype(np.float64), terminated, truncated, infos

    def render(self):
        if self.render_mode is None:
            gymnasium.logger.warn("render() called without a render_mode; make the env with render_mode='rgb_array'")
            return None
        if self.states is None:
            raise gymnasium.error.ResetNeeded("call reset() before render()")
        states, params = jax.device_get((self.states, self.params))
        return tuple(self._draw(jax.tree.map(lambda x: x[i], states), params) for i in range(self.num_envs))


class GridPinpadVectorEnv(_VectorEnv):
    """`num_envs` gridworld-pinpads as a `gymnasium.vector.VectorEnv`."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": RENDER_FPS, "autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(
        self,
        num_envs: int,
        render_mode: str | None = None,
        task: str | int = "pretrain",
        any_task: bool = False,
        solvable_only: bool = False,
        horizon: int = 100,
    ):
        super().__init__(GridPinpad(horizon=horizon), num_envs, render_mode, task, any_task, solvable_only,
                         spaces.Box(0, 1, (OBS_DIM,), np.uint8), spaces.Discrete(NUM_ACTIONS))

    def _functions(self):
        return _vector_functions(GridPinpad, grid_info, self.jax_env.horizon, self.config.solvable_only, self.num_envs)

    def _validate(self, actions):
        return validate_actions(actions, self.num_envs)

    def _draw(self, state, params):
        return render_state(state, params)


# --- ant-pinpad: a single environment and a vector one
#
# `gymnasium.make("hrl/AntPinpad-v0", task="posttrain")`, or `gymnasium.make_vec("hrl/AntPinpad-v0",
# num_envs=64)` with the grid's same-step autoreset and without rendering. The same episode configuration as the
# grid's (task "pretrain" | "posttrain" | a pretraining task index 0..15 or colour tuple such as
# (0, 3, 2); any_task; solvable_only), the same seeding (JAX keys drawn from `np_random`), one
# jitted reset and step on the host's side of each call. Actions: 8 float torques in [-1, 1]; a
# wrong shape or a non-finite value is refused, values outside [-1, 1] are clipped by the physics.
# render_mode="rgb_array" draws the top-down 2-D plot of the episode so far (envs.render: no
# OpenGL context was available for MuJoCo's 3-D renderer).

ANT_ACTION_DIM = 8


@dataclass(frozen=True)
class AntEpisodeConfig(EpisodeConfig):
    """What an ant-pinpad reset draws (see above)."""

    def params(self) -> pinpad.PinpadParams:
        return _ant_task_params(ant_task_key(self.task), bool(self.any_task))


def ant_task_key(task) -> str | int:
    """'pretrain', 'posttrain' or a pretraining task index, from any accepted spelling."""
    count = len(pinpad.ANT_PRETRAIN_TASKS)
    if isinstance(task, str) and task in ("pretrain", "posttrain"):
        return task
    if isinstance(task, (tuple, list)) and tuple(task) == pinpad.ANT_POSTTRAIN_TASK:
        return "posttrain"
    if isinstance(task, (tuple, list)) and tuple(task) in pinpad.ANT_PRETRAIN_TASKS:
        return pinpad.ANT_PRETRAIN_TASKS.index(tuple(task))
    if isinstance(task, (int, np.integer)) and not isinstance(task, bool) and 0 <= task < count:
        return int(task)
    raise ValueError(
        f"invalid task {task!r}: use 'pretrain', 'posttrain', a pretraining task index 0..{count - 1}, "
        f"or a colour tuple of ANT_PRETRAIN_TASKS or {pinpad.ANT_POSTTRAIN_TASK}"
    )


@functools.lru_cache(maxsize=None)
def _ant_task_params(task: str | int, any_task: bool) -> pinpad.PinpadParams:
    from envs.ant_pinpad import AntPinpad

    env = AntPinpad()
    if task == "pretrain":
        return env.pretrain_params(any_task=any_task)
    if task == "posttrain":
        return env.posttrain_params()
    return env.fixed_task_params(task)


def _as_torques(actions, shape: tuple[int, ...], valid: str) -> np.ndarray:
    """`actions` as float32 of `shape`, refusing what does not convert, a wrong shape or a non-finite value."""
    try:
        array = np.asarray(actions, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise _action_error(actions, f"not convertible to a float array ({err})", valid) from None
    if array.shape != shape:
        raise _action_error(actions, f"has shape {array.shape}", valid)
    if not np.all(np.isfinite(array)):
        raise _action_error(actions, "not finite", valid)
    return array


def validate_ant_action(action) -> np.ndarray:
    """One action as float32 [8], or a ValueError naming it."""
    return _as_torques(action, (ANT_ACTION_DIM,), f"{ANT_ACTION_DIM} finite torques (Box(-1, 1, ({ANT_ACTION_DIM},)))")


def validate_ant_actions(actions, num_envs: int) -> np.ndarray:
    """A batch of actions as float32 [num_envs, 8], or a ValueError naming it."""
    valid = f"{num_envs} x {ANT_ACTION_DIM} finite torques (Box(-1, 1, ({num_envs}, {ANT_ACTION_DIM})))"
    return _as_torques(actions, (num_envs, ANT_ACTION_DIM), valid)


class AntPinpadGymEnv(_SingleEnv):
    """One ant-pinpad (see envs/ant_pinpad.py) behind gymnasium's API."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}
    episode_config = AntEpisodeConfig

    def __init__(
        self,
        render_mode: str | None = None,
        task: str | int | tuple = "pretrain",
        any_task: bool = False,
        solvable_only: bool = False,
        horizon: int = 500,
    ):
        from envs.ant_pinpad import OBS_BOUND, OBS_DIM as ANT_OBS_DIM, AntPinpad

        super().__init__(AntPinpad(horizon=horizon), render_mode, task, any_task, solvable_only)
        self.observation_space = spaces.Box(-OBS_BOUND, OBS_BOUND, (ANT_OBS_DIM,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (ANT_ACTION_DIM,), np.float32)
        self._path = []  # torso x, y so far, for rendering

    def _functions(self, solvable_only: bool):
        from envs.ant_pinpad import AntPinpad, info as ant_info

        return _single_functions(AntPinpad, ant_info, self.jax_env.horizon, solvable_only)

    def _validate(self, action):
        return validate_ant_action(action)

    def _on_new_state(self, first: bool) -> None:
        if first:
            self._path = []
        if first or self.render_mode is not None:
            self._path.append(np.asarray(jax.device_get(self.state.body.qpos[:2])))

    def _draw(self):
        from envs.render import ant_trajectory_frame

        state = jax.device_get(self.state)
        return ant_trajectory_frame(np.stack(self._path), state.colour_cells, state.wall_cells, f"t {int(state.t)}")


class AntPinpadVectorEnv(_VectorEnv):
    """`num_envs` ant-pinpads as a `gymnasium.vector.VectorEnv`: one jitted call steps them all (the
    physics of every ant in one MJX batch). No rendering: draw one episode with AntPinpadGymEnv."""

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.SAME_STEP}
    episode_config = AntEpisodeConfig

    def __init__(
        self,
        num_envs: int,
        render_mode: str | None = None,
        task: str | int | tuple = "pretrain",
        any_task: bool = False,
        solvable_only: bool = False,
        horizon: int = 500,
    ):
        from envs.ant_pinpad import OBS_BOUND, OBS_DIM as ANT_OBS_DIM, AntPinpad

        super().__init__(AntPinpad(horizon=horizon), num_envs, render_mode, task, any_task, solvable_only,
                         spaces.Box(-OBS_BOUND, OBS_BOUND, (ANT_OBS_DIM,), np.float32),
                         spaces.Box(-1.0, 1.0, (ANT_ACTION_DIM,), np.float32))

    def _functions(self):
        from envs.ant_pinpad import AntPinpad, info as ant_info

        return _vector_functions(AntPinpad, ant_info, self.jax_env.horizon, self.config.solvable_only, self.num_envs)

    def _validate(self, actions):
        return validate_ant_actions(actions, self.num_envs)
