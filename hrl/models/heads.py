"""The base model's output heads: which distribution its outputs parameterise, chosen from the
environment's spaces, and every quantity the stages compute from them.

A base model (`hrl.models.transformer.ResidualStreamModel`, either backbone) ends in two linear
heads on its normalised last residual. Their outputs (`Output.action_params`, `Output.obs_params`)
are the parameters of
- the action distribution p(a_t | o_1..o_t): `Categorical` for a `Discrete` space (the grid's 4
  moves), `DiagGaussian` for a real `Box` (the ant's 8 torques);
- the next-observation prediction p(o_{t+1} | o_1..o_t): `Bernoulli` bits for a binary `Box`
  (the grid's one-hot cells), `UnitGaussian` for a real `Box` (the ant's features).
The model keeps the two families as `model.action_dist` and `model.obs_dist` (static, hashable
frozen dataclasses: part of the model's graph, not of its parameters), so that an algorithm calls
`model.action_dist.log_prob(out.action_params, action)` and works on either space unchanged.

What an action family offers: `sample`, `mode` (the most likely action: argmax / the mean),
`log_prob`, `nll`, `entropy`, `kl` (exact, between two outputs of the same family), and for
supervised training on "targets" (`targets(actions)`: what a dataset's actions become; for the
categorical also a soft distribution over actions, e.g. the expert's) `target_nll` and
`target_fit`, a per-step measure of how well the head's mode fits the target, logged as
`fit_metric`. `fit(params, action)` is `target_fit` on `targets(action)`.

The categorical computations are written exactly as the stages wrote them before this module
existed (same operations in the same order), so the grid's numbers are bitwise unchanged: that is
why `nll` (optax's integer-label cross-entropy, the training loss) and `-log_prob` (log-softmax
and a gather, the RL ratio) are two functions that agree only up to rounding.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Union

import jax
import jax.numpy as jnp
import optax

from envs.base import Box, Discrete

# Bounds on the Gaussian action head's log standard deviation. The floor keeps log-probabilities
# finite where the data's actions are (nearly) a function of the history, as in D* (the expert's
# mean action), which would otherwise drive the standard deviation to zero and the NLL to -inf;
# e^-5 = 0.007 is far below any useful resolution of a torque in [-1, 1]. The ceiling, e^2 = 7.4,
# is far wider than the action range, so it never binds on sensible data. The same bounds as
# internal RL's policy over z (hrl.algos.internal_rl). A hard clip (no gradient beyond a bound),
# as there: the raw output starts near 0 (std 1, an uninformed start that covers the whole range).
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclasses.dataclass(frozen=True)
class Categorical:
    """One of `num_actions` actions; params are the logits [..., num_actions]. Targets are
    distributions over the actions [..., num_actions] (one-hot for a taken action)."""

    num_actions: int
    fit_metric = "action_accuracy"  # the share of steps whose most likely action the target allows

    @property
    def size(self) -> int:
        return self.num_actions

    def sample(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        return jax.random.categorical(key, logits)

    def mode(self, logits: jax.Array) -> jax.Array:
        return jnp.argmax(logits, -1)

    def log_prob(self, logits: jax.Array, action: jax.Array) -> jax.Array:
        log_probs = jax.nn.log_softmax(logits)
        return jnp.take_along_axis(log_probs, action[..., None], axis=-1)[..., 0]

    def nll(self, logits: jax.Array, action: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(logits, action)

    def entropy(self, logits: jax.Array) -> jax.Array:
        log_probs = jax.nn.log_softmax(logits)
        return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)

    def kl(self, logits: jax.Array, other_logits: jax.Array) -> jax.Array:
        """KL(p || q) of p = softmax(logits), q = softmax(other_logits)."""
        log_probs, other_log_probs = jax.nn.log_softmax(logits), jax.nn.log_softmax(other_logits)
        return jnp.sum(jnp.exp(log_probs) * (log_probs - other_log_probs), axis=-1)

    def targets(self, actions: jax.Array) -> jax.Array:
        return jax.nn.one_hot(actions, self.num_actions)

    def target_nll(self, logits: jax.Array, targets: jax.Array) -> jax.Array:
        """The cross-entropy -sum_a q(a) log p(a) to a target distribution q."""
        return optax.softmax_cross_entropy(logits, targets)

    def target_fit(self, logits: jax.Array, targets: jax.Array) -> jax.Array:
        """Whether the most likely action is one the target allows (bool)."""
        return jnp.take_along_axis(targets, jnp.argmax(logits, -1)[..., None], -1)[..., 0] > 0

    def fit(self, logits: jax.Array, action: jax.Array) -> jax.Array:
        """Whether the most likely action is `action` (bool)."""
        return jnp.argmax(logits, -1) == action


@dataclasses.dataclass(frozen=True)
class DiagGaussian:
    """A real action vector [..., action_dim] from N(mean, diag(std^2)); params are
    [..., 2 * action_dim]: the mean, then the log standard deviation before clipping into
    [LOG_STD_MIN, LOG_STD_MAX]. Targets are the actions themselves.

    The standard deviation is state-dependent (an output of the model, like the mean), not one
    learned vector for all states (DECIDE): the base model cannot see the task, so how sure it can
    be of the next action depends on the history (right after a subgoal the next colour is
    ambiguous; halfway to a cell it is not), and the controllers and the metacontroller, which
    steer the residual stream, may then sharpen the action distribution as well as move it. A
    global vector (the PPO expert's form, so exactly right for D's sampling noise) is the special
    case the model can still learn. Samples are not clipped: the environment clips actions into
    its range (the ant's actuators do), and the log-probability stays that of the sample drawn."""

    action_dim: int
    fit_metric = "action_mse"  # the mean over action components of (mean action - target action)^2

    @property
    def size(self) -> int:
        return 2 * self.action_dim

    def mean_and_log_std(self, params: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean, log_std = jnp.split(params, 2, axis=-1)
        return mean, jnp.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)

    def sample(self, params: jax.Array, key: jax.Array) -> jax.Array:
        mean, log_std = self.mean_and_log_std(params)
        return mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape, mean.dtype)

    def mode(self, params: jax.Array) -> jax.Array:
        return self.mean_and_log_std(params)[0]

    def log_prob(self, params: jax.Array, action: jax.Array) -> jax.Array:
        mean, log_std = self.mean_and_log_std(params)
        return jnp.sum(-0.5 * jnp.square((action - mean) * jnp.exp(-log_std)) - log_std - HALF_LOG_2PI, axis=-1)

    def nll(self, params: jax.Array, action: jax.Array) -> jax.Array:
        return -self.log_prob(params, action)

    def entropy(self, params: jax.Array) -> jax.Array:
        _, log_std = self.mean_and_log_std(params)
        return jnp.sum(log_std + HALF_LOG_2PI + 0.5, axis=-1)

    def kl(self, params: jax.Array, other_params: jax.Array) -> jax.Array:
        """KL(p || q) of two diagonal Gaussians, summed over the action components."""
        mean, log_std = self.mean_and_log_std(params)
        other_mean, other_log_std = self.mean_and_log_std(other_params)
        ratio = jnp.exp(2 * (log_std - other_log_std))  # var_p / var_q
        distance = jnp.square((mean - other_mean) * jnp.exp(-other_log_std))
        return jnp.sum(other_log_std - log_std + 0.5 * (ratio + distance - 1.0), axis=-1)

    def targets(self, actions: jax.Array) -> jax.Array:
        return actions.astype(jnp.float32)

    def target_nll(self, params: jax.Array, targets: jax.Array) -> jax.Array:
        return self.nll(params, targets)

    def target_fit(self, params: jax.Array, targets: jax.Array) -> jax.Array:
        return jnp.mean(jnp.square(self.mode(params) - targets), axis=-1)

    def fit(self, params: jax.Array, action: jax.Array) -> jax.Array:
        return self.target_fit(params, self.targets(action))


@dataclasses.dataclass(frozen=True)
class Bernoulli:
    """Independent bits [..., obs_dim]; params are their logits."""

    obs_dim: int

    @property
    def size(self) -> int:
        return self.obs_dim

    def nll(self, logits: jax.Array, obs: jax.Array) -> jax.Array:
        """-log p(obs), summed over the bits."""
        return optax.sigmoid_binary_cross_entropy(logits, obs.astype(jnp.float32)).sum(-1)

    def mode(self, logits: jax.Array) -> jax.Array:
        return (logits > 0).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class UnitGaussian:
    """Real features [..., obs_dim] from N(mean, I); params are the mean. A fixed unit variance
    (DECIDE) makes the NLL half the squared error plus a constant (0.5 log 2 pi per feature,
    included so that it is a true NLL in nats): the loss the paper's lambda = 10 weighs. A learned
    variance could let the model discount the hard features (the ant's joint velocities) instead
    of predicting them; the ant's features are symlog'd or scaled to about [-1, 1], so one unit
    of variance is of their scale."""

    obs_dim: int

    @property
    def size(self) -> int:
        return self.obs_dim

    def nll(self, mean: jax.Array, obs: jax.Array) -> jax.Array:
        """-log p(obs), summed over the features."""
        return jnp.sum(0.5 * jnp.square(obs.astype(jnp.float32) - mean) + HALF_LOG_2PI, axis=-1)

    def mode(self, mean: jax.Array) -> jax.Array:
        return mean


ActionDist = Union[Categorical, DiagGaussian]
ObsDist = Union[Bernoulli, UnitGaussian]
# What a model is built from: the environment's space, a family, or (the grid's form before this
# module) the number of discrete actions and the number of observation bits.
ActionSpec = Union[ActionDist, Discrete, Box, int]
ObservationSpec = Union[ObsDist, Box, int]


def for_actions(action: ActionSpec) -> ActionDist:
    """The action family of an action space (an int n: n discrete actions; a family: itself)."""
    if isinstance(action, (Categorical, DiagGaussian)):
        return action
    if isinstance(action, Discrete):
        return Categorical(action.n)
    if isinstance(action, Box) and len(action.shape) == 1 and jnp.issubdtype(action.dtype, jnp.floating):
        return DiagGaussian(action.shape[0])
    if isinstance(action, int) and not isinstance(action, bool):
        return Categorical(action)
    raise ValueError(f"no action head for {action!r}: expected Discrete, a real 1-d Box, or an int")


def for_observations(observation: ObservationSpec) -> ObsDist:
    """The next-observation family of an observation space (an int d: d bits, the grid's case;
    a family: itself). A Box of integers in [0, 1] is bits; a real Box is Gaussian."""
    if isinstance(observation, (Bernoulli, UnitGaussian)):
        return observation
    if isinstance(observation, Box) and len(observation.shape) == 1:
        if jnp.issubdtype(observation.dtype, jnp.integer) and observation.low == 0 and observation.high == 1:
            return Bernoulli(observation.shape[0])
        if jnp.issubdtype(observation.dtype, jnp.floating):
            return UnitGaussian(observation.shape[0])
    if isinstance(observation, int) and not isinstance(observation, bool):
        return Bernoulli(observation)
    raise ValueError(f"no observation head for {observation!r}: expected a binary or real 1-d Box, or an int")
