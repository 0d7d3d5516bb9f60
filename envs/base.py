"""The environment interface: pure functions of (key, state, action, params), gymnax style.

Every environment is a stateless object holding only static sizes. Per-episode options (the
task, the task set, noise) live in a params pytree, so they can be vmapped and changed without
recompiling. `step` never resets: auto-reset is the `envs.wrappers.AutoReset` wrapper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import jax
import jax.numpy as jnp

Params = TypeVar("Params")
State = TypeVar("State")


@dataclass(frozen=True)
class Discrete:
    """`n` actions, 0 .. n-1."""

    n: int

    def sample(self, key: jax.Array, shape: tuple[int, ...] = ()) -> jax.Array:
        return jax.random.randint(key, shape, 0, self.n, dtype=jnp.int32)

    def contains(self, x: jax.Array) -> jax.Array:
        return (x >= 0) & (x < self.n)


@dataclass(frozen=True)
class Box:
    """A real (or binary, with low=0, high=1 and an integer dtype) array of fixed shape."""

    low: float
    high: float
    shape: tuple[int, ...]
    dtype: Any = jnp.float32

    def sample(self, key: jax.Array, shape: tuple[int, ...] = ()) -> jax.Array:
        if jnp.issubdtype(self.dtype, jnp.integer):
            return jax.random.randint(key, shape + self.shape, self.low, self.high + 1).astype(self.dtype)
        return jax.random.uniform(key, shape + self.shape, self.dtype, self.low, self.high)


class Env(Generic[State, Params]):
    """Base class. Subclasses implement `reset`, `step`, the spaces and `default_params`."""

    name: str = "Env"

    def reset(self, key: jax.Array, params: Params) -> tuple[jax.Array, State]:
        raise NotImplementedError

    def step(
        self, key: jax.Array, state: State, action: jax.Array, params: Params
    ) -> tuple[jax.Array, State, jax.Array, jax.Array, jax.Array, dict[str, jax.Array]]:
        """Returns (obs, state, reward, terminated, truncated, info)."""
        raise NotImplementedError

    def observe(self, state: State, params: Params) -> jax.Array:
        """The observation of a state (what reset and step return)."""
        raise NotImplementedError

    def subgoal(self, state: State, params: Params) -> jax.Array:
        """The ground-truth subgoal the agent is working on in `state` (for labels and analysis,
        never a model input)."""
        raise NotImplementedError

    @property
    def num_subgoals(self) -> int:
        """How many ground-truth subgoals there are: `subgoal` reports 0 .. num_subgoals - 1, or -1
        when none is left (the task is over)."""
        raise NotImplementedError

    @property
    def default_params(self) -> Params:
        raise NotImplementedError

    @property
    def observation_space(self) -> Box:
        raise NotImplementedError

    @property
    def action_space(self) -> Discrete | Box:
        raise NotImplementedError

    @property
    def max_steps(self) -> int:
        """The horizon: `truncated` becomes true at this step."""
        raise NotImplementedError
