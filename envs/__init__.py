"""JAX-native pinpad environments (pure functions, gymnax style) and their tools.

`envs.make(name, **kwargs)` builds a registered environment; `envs.registered()` lists names.
"""

from __future__ import annotations

from typing import Callable

from envs.base import Env

_REGISTRY: dict[str, Callable[..., Env]] = {}


def register(name: str, factory: Callable[..., Env]) -> None:
    _REGISTRY[name] = factory


def registered() -> list[str]:
    return sorted(_REGISTRY)


def make(name: str, **kwargs) -> Env:
    if name not in _REGISTRY:
        raise ValueError(f"unknown environment {name!r}; registered: {', '.join(registered())}")
    return _REGISTRY[name](**kwargs)


def _grid_pinpad(**kwargs) -> Env:
    from envs.grid_pinpad import GridPinpad

    return GridPinpad(**kwargs)


register("GridPinpad-v0", _grid_pinpad)


def _grid_goal(**kwargs) -> Env:
    from envs.grid_goal import GridGoal

    return GridGoal(**kwargs)


def _grid_pinpad_goal(**kwargs) -> Env:
    """gridworld-pinpad's post-training task as goal reaching: progress in the observation,
    "task complete" as the goal (envs/goals.py)."""
    from envs.goals import PinpadProgressGoal
    from envs.grid_pinpad import GridPinpad

    return PinpadProgressGoal(GridPinpad(**kwargs))


register("GridGoal-v0", _grid_goal)
register("GridPinpadGoal-v0", _grid_pinpad_goal)


def _ant_pinpad(**kwargs) -> Env:
    from envs.ant_pinpad import AntPinpad  # imports MuJoCo MJX: only when an ant is made

    return AntPinpad(**kwargs)


def _ant_goal(solvable_only: bool = False, **kwargs) -> Env:
    """`solvable_only` is accepted like every env's and changes nothing: every target can be reached."""
    from envs.ant_goal import AntGoal

    return AntGoal(**kwargs)


def _ant_pinpad_expert(**kwargs) -> Env:
    """ant-pinpad with the PPO expert's privileged observation and dense reward."""
    from envs.ant_pinpad import PrivilegedAntPinpad

    return PrivilegedAntPinpad(**kwargs)


def _ant_pinpad_goal(**kwargs) -> Env:
    """ant-pinpad's post-training task as goal reaching, as GridPinpadGoal-v0 (envs/goals.py)."""
    from envs.goals import PinpadProgressGoal

    return PinpadProgressGoal(_ant_pinpad(**kwargs))


register("AntPinpad-v0", _ant_pinpad)
register("AntGoal-v0", _ant_goal)
register("AntPinpadGoal-v0", _ant_pinpad_goal)
register("AntPinpadExpert-v0", _ant_pinpad_expert)


def _register_with_gymnasium() -> None:
    """Makes `gymnasium.make` and `gymnasium.make_vec` of "hrl/GridPinpad-v0" and "hrl/AntPinpad-v0"
    work after `import envs`. The adapters (envs/gymnasium.py) load only when an environment is made."""
    import gymnasium

    if "hrl/GridPinpad-v0" not in gymnasium.registry:
        gymnasium.register(
            id="hrl/GridPinpad-v0",
            entry_point="envs.gymnasium:GridPinpadGymEnv",
            vector_entry_point="envs.gymnasium:GridPinpadVectorEnv",
        )
    if "hrl/AntPinpad-v0" not in gymnasium.registry:
        gymnasium.register(
            id="hrl/AntPinpad-v0",
            entry_point="envs.gymnasium:AntPinpadGymEnv",
            vector_entry_point="envs.gymnasium:AntPinpadVectorEnv",
        )


_register_with_gymnasium()
