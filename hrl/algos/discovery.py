"""Phase 2: discover temporally abstract actions with a metacontroller, without subgoal labels.

The metacontroller (hrl.models.metacontroller) reads the residual stream e_{t,l} of the base
model at layer l (default L/2) and steers it with e_t + U_t e_t. It is trained on the clean
expert data D* by

    loss = mean over valid steps of [ -log p(a_t | steered model) + alpha * KL(N(mu_t, Sigma_t) || N(0, I)) ]

The KL is paid at every step, not weighted by beta_t, and nothing regularises beta: switching
costs information only when the new proposal is used, so the gate learns to switch where the
base model needs new information (paper: at subgoal boundaries). Proposal noise is sampled
(reparameterised) in training; evaluation uses the proposal means. Departures, all DECIDE and
off in the paper preset except the first: episodes can be fresh clean-expert episodes generated
in the update (`data: online`) instead of a fixed D*; alpha can stay 0 for a while
(`kl_delay_updates`) and then ramp up from 0 (`kl_warmup_updates`); the NLL's target can be the
clean expert's distribution instead of the action taken (`labels: expert`). With the
metacontroller's per-step summaries and gate noise (`hrl.models.metacontroller`), the target is
what made the gate switch at the subgoal boundaries in the quick preset
(docs/gridworld_findings.md, "Discovery").

Variants (`variant`):
- "frozen": the base model is frozen, closed over as a constant (its parameters are not in the
  train state); the paper's method.
- "beta1": the same with beta fixed to 1, a new z at every step (an ablation).
- "cotrained": base model and metacontroller trained together from scratch on the same loss
  (an ablation: the paper sees the switching collapse to a single switch at the start).

The sweep over alpha trains side by side in one update: every parameter (and, co-trained, the
base model too) has a leading alpha axis, the optimiser acts on each alpha on its own, and the
frozen base's lower blocks run once for all of them. Evaluation, on held-out episodes of D*,
gives per alpha the action NLL and the KL (the rate-distortion point) and the switching
statistics of hrl.analysis.segmentation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hrl.analysis.segmentation import switching_statistics
from hrl.data import expert as expert_data
from hrl.infra.config import check
from hrl.infra.mesh import Mesh, shard_batch
from hrl.infra.objectives import masked_mean
from hrl.infra.train_state import TrainState, adamw, independent_along_leading_axis
from hrl.models.metacontroller import Metacontroller, MetacontrollerConfig, gaussian_kl
from hrl.models.transformer import Transformer

VARIANTS = ("frozen", "beta1", "cotrained")
PAPER_ALPHAS = (0.0, 0.05, 0.1, 0.17, 0.3, 0.5, 1.0)


@dataclasses.dataclass
class DiscoveryConfig:
    """Paper (grid): alpha swept over PAPER_ALPHAS; 64k updates of batch 512; AdamW lr 1e-3, wd 0.03."""

    alphas: tuple[float, ...] = PAPER_ALPHAS
    layer: int | None = None  # the controlled layer; None: L // 2
    learning_rate: float = 1e-3
    weight_decay: float = 0.03
    max_grad_norm: float = 1.0
    batch_size: int = 512  # episodes of D* per update
    num_updates: int = 64000
    updates_per_chunk: int = 100
    # "online": fresh episodes of D*'s clean expert inside every update, never the same twice;
    # "dataset": episodes of the collected D* (without its held-out part). A CPU-sized D* (1024
    # episodes) was overfitted within 2000 updates: held-out NLL rose from 0.46 to 0.87 at alpha 0.
    data: str = "online"
    heldout_fraction: float = 0.2  # the last episodes of D*, for evaluation (and never trained on)
    switch_threshold: float = 0.5  # beta >= threshold is a switch event
    # DECIDE (not in the paper): alpha rises linearly from 0 over the first updates. With the full
    # alpha from the start, the KL pulls every proposal to the prior before the decoder has learnt
    # to use z; z is then noise, the gate closes for good and z stays 0 (seen in the quick preset).
    kl_warmup_updates: int = 0
    # DECIDE (not in the paper): alpha stays 0 for this many updates before its warm-up begins, so
    # the decoder learns to use z while information is free. Seed 0, quick preset, 1000 updates at
    # alpha 0 then 500 of warm-up and 500 at full alpha: at alpha 0.05 / 0.17 the held-out KL was
    # 0.39 / 0.13 nats per step and the NLL 0.272 / 0.287 (unsteered base 0.342), where without
    # the delay every alpha > 0 collapsed to KL 0.003 and the base's NLL. But the gate never
    # reached 0.5 and was no higher at subgoal boundaries (0.05 there and elsewhere at 0.17, 0.26 at
    # the first step): the latent codes the episode from its start instead of switching (F1 0).
    kl_delay_updates: int = 0
    # DECIDE (not in the paper): the action NLL's target. "taken": the action in D* (the paper's);
    # "expert" (online grid data): the clean expert's distribution over its shortest-path moves at
    # each step. D*'s expert breaks ties between shortest paths at random, and the non-causal
    # encoder sees the path taken: with "taken" targets its cheapest use of z is to name the next
    # tie-break at every step (at alpha 0.3, held-out NLL 0.034 for 0.49 nats of KL per step with
    # per-step summaries), not the subgoal. Against the distribution, naming the move saves
    # nothing; only what the expert aims at (the subgoal) does.
    labels: str = "taken"

    def validate(self) -> None:
        for name in ("learning_rate", "max_grad_norm", "batch_size", "num_updates", "updates_per_chunk"):
            check(getattr(self, name) > 0, name, "must be > 0", getattr(self, name))
        check(len(self.alphas) >= 1 and all(alpha >= 0 for alpha in self.alphas), "alphas",
              "must be one or more values >= 0", self.alphas)
        check(len(set(self.alphas)) == len(self.alphas), "alphas", "must be distinct", self.alphas)
        check(self.layer is None or self.layer >= 0, "layer", "must be >= 0 (or null: L // 2)", self.layer)
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        check(self.data in ("online", "dataset"), "data", "must be 'online' or 'dataset'", self.data)
        check(self.kl_warmup_updates >= 0, "kl_warmup_updates", "must be >= 0", self.kl_warmup_updates)
        check(self.labels in ("taken", "expert"), "labels", "must be 'taken' or 'expert'", self.labels)
        check(self.labels == "taken" or self.data == "online", "labels", "'expert' needs data=online", self.labels)
        check(self.kl_delay_updates >= 0, "kl_delay_updates", "must be >= 0", self.kl_delay_updates)
        check(0 < self.heldout_fraction < 1, "heldout_fraction", "must be in (0, 1)", self.heldout_fraction)
        check(0 < self.switch_threshold < 1, "switch_threshold", "must be in (0, 1)", self.switch_threshold)
        check(self.num_updates % self.updates_per_chunk == 0, "num_updates",
              f"must be a multiple of updates_per_chunk ({self.updates_per_chunk})", self.num_updates)

    @property
    def num_chunks(self) -> int:
        return self.num_updates // self.updates_per_chunk

    def controlled_layer(self, num_layers: int) -> int:
        return num_layers // 2 if self.layer is None else self.layer


def alpha_name(alpha: float) -> str:
    return f"alpha_{alpha:g}"


class Learner(nnx.Module):
    """What one alpha trains: the metacontroller, and the base model when co-trained."""

    def __init__(self, metacontroller: Metacontroller, base: Transformer | None = None):
        self.metacontroller = metacontroller
        self.base = base


def init(key: jax.Array, cfg: DiscoveryConfig, meta_cfg: MetacontrollerConfig, variant: str,
         base: Transformer | Callable[[jax.Array], Transformer]) -> TrainState:
    """One learner per alpha, stacked on a leading axis. `base` is the frozen base model, or for
    "cotrained" a function key -> a freshly initialised base model."""
    check(variant in VARIANTS, "variant", f"must be one of {VARIANTS}", variant)
    init_key, train_key = jax.random.split(key)

    def make(key):
        meta_key, base_key = jax.random.split(key)
        cotrained = base(base_key) if variant == "cotrained" else None
        width = cotrained.cfg.width if cotrained is not None else base.cfg.width
        meta = Metacontroller(meta_cfg, width, rngs=nnx.Rngs(params=meta_key), always_switch=variant == "beta1")
        return Learner(meta, cotrained)

    graphdef, _ = nnx.split(make(init_key))
    params = jax.vmap(lambda k: nnx.split(make(k))[1])(jax.random.split(init_key, len(cfg.alphas)))
    optimizer = make_optimizer(cfg)
    return TrainState(params=params, opt_state=optimizer.init(params), key=train_key, graphdef=graphdef)


def make_optimizer(cfg: DiscoveryConfig) -> optax.GradientTransformation:
    return independent_along_leading_axis(adamw(cfg.learning_rate, cfg.weight_decay, cfg.max_grad_norm))



def run_learner(learner: Learner, frozen_base: Transformer | None, layer: int, obs: jax.Array,
                lower: jax.Array | None, actions: jax.Array, mask: jax.Array, noise: jax.Array,
                gate_noise: jax.Array | None = None) -> dict[str, jax.Array]:
    """One learner on a batch of episodes: per-step action NLL, KL, beta, and the means of the first two.
    `lower` is the frozen base's e_layer (computed once for all alphas), None when co-trained;
    `gate_noise` [B, T] is added to the gate's logits (`switch_noise`)."""
    base = learner.base if learner.base is not None else frozen_base
    e = base.lower(obs, layer) if lower is None else lower
    sequence = jax.vmap(learner.metacontroller)(e, mask, noise, gate_noise)
    logits = base.upper(learner.metacontroller.steer(e, sequence.z), layer).action_params
    # [B, T]: the taken discrete actions; [B, T, A]: the head's targets
    # (the expert's distributions of `labels: expert`, or continuous actions, whose target_nll is nll).
    nll = (base.action_dist.nll if actions.ndim == mask.ndim else base.action_dist.target_nll)(logits, actions)
    kl = gaussian_kl(sequence.mean, sequence.log_var)
    return {"nll": nll, "kl": kl, "beta": sequence.beta, "action_nll": masked_mean(nll, mask),
            "kl_per_step": masked_mean(kl, mask)}


def crop_episodes(dataset: Any, length: int | None = None) -> Any:
    """The dataset with its time axis cut after `length` steps (default: its longest episode). The
    steps after the longest episode are padding in every episode (D*'s episodes average about a
    third of the horizon) and cost as much as real ones: crop datasets before handing them over."""
    length = int(np.max(dataset.lengths)) if length is None else length
    return dataset.replace(**{name: getattr(dataset, name)[:, :length]
                              for name in ("obs", "actions", "mask", "subgoals")})


Episodes = Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]]  # key -> (obs, actions, mask)


def dataset_episodes(dataset: Any, batch_size: int) -> Episodes:
    """`sample(key)`: `batch_size` episodes of `dataset`, uniformly with replacement."""
    obs, actions, mask = jnp.asarray(dataset.obs), jnp.asarray(dataset.actions), jnp.asarray(dataset.mask)

    def sample(key: jax.Array):
        episodes = jax.random.randint(key, (batch_size,), 0, obs.shape[0])
        return obs[episodes], actions[episodes], mask[episodes]

    return sample


def online_episodes(env: Any, env_params: Any, expert: Callable, batch_size: int,
                    label: Callable[[Any, Any], jax.Array] | None = None) -> Episodes:
    """`sample(key)`: `batch_size` fresh expert episodes (padded to the horizon), inside jit; with
    `label(state, params)` (`labels: expert`), its distribution over actions at each step in place
    of the taken action."""

    def sample(key: jax.Array):
        episodes, labels = jax.vmap(lambda k: expert_data.rollout_expert_labelled(
            env, env_params, expert, label or (lambda state, params: None), k))(jax.random.split(key, batch_size))
        return episodes.obs, episodes.actions if label is None else labels, episodes.mask

    return sample


def kl_scale(cfg: DiscoveryConfig, updates_done: jax.Array) -> jax.Array:
    """The factor on alpha in the update after `updates_done` updates: 0 for the first
    `kl_delay_updates`, then rising linearly to 1 over `kl_warmup_updates` (at once without)."""
    ramped = updates_done + 1 - cfg.kl_delay_updates
    if cfg.kl_warmup_updates:
        return jnp.clip(ramped / cfg.kl_warmup_updates, 0.0, 1.0)
    return (ramped > 0).astype(jnp.float32)


def make_train_chunk(cfg: DiscoveryConfig, meta_cfg: MetacontrollerConfig, frozen_base: Transformer | None,
                     layer: int, sample_episodes: Episodes, mesh: Mesh | None = None
                     ) -> Callable[[TrainState], tuple[TrainState, dict]]:
    """A jitted `train_chunk(state) -> (state, metrics)` on batches from `sample_episodes`: per
    alpha `loss`, `action_nll` and `kl` (nats per step), and `mean_beta`. `frozen_base` None:
    co-trained (the base is in the state). With a `mesh`, the episodes are split over its devices."""
    alphas = jnp.asarray(cfg.alphas)
    optimizer = make_optimizer(cfg)

    def loss_fn(params, graphdef, alpha, lower, batch_obs, batch_actions, batch_mask, noise, gate_noise):
        out = run_learner(nnx.merge(graphdef, params), frozen_base, layer, batch_obs, lower, batch_actions,
                          batch_mask, noise, gate_noise)
        loss = out["action_nll"] + alpha * out["kl_per_step"]
        return loss, (out["action_nll"], out["kl_per_step"], masked_mean(out["beta"], batch_mask))

    def update(state: TrainState, _):
        key, batch_key, noise_key = jax.random.split(state.key, 3)
        batch_obs, batch_actions, batch_mask = shard_batch(sample_episodes(batch_key), mesh)
        # The frozen base's lower blocks: once for every alpha, outside the differentiated function.
        lower = frozen_base.lower(batch_obs, layer) if frozen_base is not None else None
        noise = shard_batch(jax.random.normal(noise_key, (*batch_mask.shape, meta_cfg.latent_size)), mesh)
        gate_noise = (shard_batch(meta_cfg.switch_noise * jax.random.logistic(
            jax.random.fold_in(noise_key, 1), batch_mask.shape), mesh) if meta_cfg.switch_noise else None)
        updates_done = optax.tree_utils.tree_get(state.opt_state, "count")[0]
        grad_fn = jax.vmap(jax.value_and_grad(loss_fn, has_aux=True), in_axes=(0, None, 0) + (None,) * 6)
        (loss, (nll, kl, beta)), grads = grad_fn(state.params, state.graphdef, kl_scale(cfg, updates_done) * alphas, lower,
                                                 batch_obs, batch_actions, batch_mask, noise, gate_noise)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(params=params, opt_state=opt_state, key=key), (loss, nll, kl, beta)

    @jax.jit
    def train_chunk(state: TrainState):
        state, values = jax.lax.scan(update, state, length=cfg.updates_per_chunk)
        metrics = {}
        for index, alpha in enumerate(cfg.alphas):
            for name, value in zip(("loss", "action_nll", "kl", "mean_beta"), values):
                metrics[f"{name}/{alpha_name(alpha)}"] = value[:, index].mean()
        return state, metrics

    return train_chunk


def make_analyse(frozen_base: Transformer | None, layer: int, heldout: Any) -> Callable[[TrainState], dict]:
    """A jitted `analyse(state)` on the held-out episodes, with the proposal means (no noise): per
    alpha, [alpha, N, T] arrays `beta`, `nll` and `kl` (zero on padding; T: the held-out arrays')."""
    arrays = jnp.asarray(heldout.obs), jnp.asarray(heldout.actions), jnp.asarray(heldout.mask)

    @jax.jit
    def analyse_arrays(state: TrainState, obs, actions, mask):  # arguments, not constants: XLA would fold them
        lower = frozen_base.lower(obs, layer) if frozen_base is not None else None

        def per_alpha(params):
            learner = nnx.merge(state.graphdef, params)
            noise = jnp.zeros((*mask.shape, learner.metacontroller.cfg.latent_size))
            out = run_learner(learner, frozen_base, layer, obs, lower, actions, mask, noise)
            return {name: jnp.where(mask, out[name], 0.0) for name in ("beta", "nll", "kl")}

        return jax.lax.map(per_alpha, state.params)  # one alpha at a time bounds memory

    def analyse(state: TrainState):
        return analyse_arrays(state, *arrays)

    return analyse


def make_evaluate(cfg: DiscoveryConfig, frozen_base: Transformer | None, layer: int, heldout: Any
                  ) -> Callable[[TrainState], dict[str, jax.Array]]:
    """An `evaluate(state)`: per alpha on the held-out episodes, `heldout_action_nll` and
    `heldout_kl` (nats per step: the rate-distortion point) and the switching statistics."""
    analyse = make_analyse(frozen_base, layer, heldout)
    subgoals, mask = jnp.asarray(heldout.subgoals), jnp.asarray(heldout.mask)

    def evaluate(state: TrainState):
        arrays = analyse(state)
        metrics = {}
        for index, alpha in enumerate(cfg.alphas):
            name = alpha_name(alpha)
            metrics[f"heldout_action_nll/{name}"] = masked_mean(arrays["nll"][index], mask)
            metrics[f"heldout_kl/{name}"] = masked_mean(arrays["kl"][index], mask)
            statistics = switching_statistics(arrays["beta"][index], subgoals, mask, cfg.switch_threshold)
            metrics.update({f"{stat}/{name}": value for stat, value in statistics.items()})
        return metrics

    return evaluate
