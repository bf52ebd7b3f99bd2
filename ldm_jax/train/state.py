"""The train state and its update: named parameter groups, each with its own optimizer and EMA.

A state holds
- trainable groups (`params[name]`), each updated by its own optax optimizer (learning rate,
  schedule, betas) and, optionally, averaged into `ema_params[name]` with its own decay;
- frozen groups (`frozen[name]`: a pretrained VAE, text encoders, a teacher, a latent scale):
  read by the loss, never differentiated, outside every optimizer (the loop may leave them out
  of checkpoints, see `loop.run(frozen_fingerprint=...)`).

An update is one or more phases, in order: each phase differentiates its loss with respect to
its own groups, holding the others as they are at that point, clips those gradients by their
global norm (over the phase's groups together, as `torch.nn.utils.clip_grad_norm_` over the
parameters one optimizer steps) and applies each group's optimizer. One phase over every group
is ordinary training; a generator phase and a discriminator phase after it is a GAN step
(the discriminator sees the generator already updated, as in Goodfellow et al. 2014, Alg. 1 with
k = 1).

The per-step PRNG key is `fold_in(seed, step)`; phase i > 0 draws from its own stream,
`fold_in(fold_in(seed, 2**31 + i), step)`, which no step key can equal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ldm_jax import sharding as sharding_lib

# The checkpoints' state layout (the meta's "state_layout"): 2 = parameters and optimizer
# states by group. Checkpoints without the field hold one params tree and one optax state (see
# `legacy_abstract`).
STATE_LAYOUT = 2
PHASE_KEY_OFFSET = 2**31


@dataclasses.dataclass(frozen=True)
class ParamGroup:
    """How one trainable group is updated: its optimizer (without clipping, which is per phase)
    and the decay of its EMA copy (0: the group keeps none)."""

    optimizer: optax.GradientTransformation
    ema_decay: float = 0.0


@dataclasses.dataclass(frozen=True)
class Phase:
    """One gradient step of an update.

    loss_fn(params, frozen, batch, rng) -> (loss, aux dict of scalars); `params` holds every
    trainable group, those of other phases included (as constants here). `name` prefixes this
    phase's metrics (the first phase's are unprefixed: "loss", "grad_norm", aux).
    """

    loss_fn: Callable
    groups: tuple[str, ...]
    grad_clip_norm: float | None = None
    name: str = ""


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray  # int32 scalar: number of updates applied
    params: Any  # {group: tree}: the trainable groups
    ema_params: Any  # {group: tree}: the EMA of the groups that keep one
    opt_state: Any  # {group: optax state}
    frozen: Any = None  # {name: tree}: read by the loss, not trained
    num_skipped: Any = None  # int32 scalar: updates skipped for non-finite values, in total
    nonfinite_streak: Any = None  # int32 scalar: ... of them in a row up to this step

    def averaged(self) -> dict:
        """{group: the EMA parameters, or the parameters of a group without EMA}."""
        return {g: self.ema_params.get(g, p) for g, p in self.params.items()}


# --- Optimizers ----------------------------------------------------------------------------------

OPTIMIZER_FIELDS = ("learning_rate", "warmup_steps", "lr_schedule", "b1", "b2", "weight_decay")


def make_optimizer(opt_config, num_train_steps: int) -> optax.GradientTransformation:
    """AdamW with linear warmup and a constant or cosine (to 10%) learning rate. opt_config: a
    mapping with OPTIMIZER_FIELDS."""
    lr, warmup = opt_config["learning_rate"], opt_config["warmup_steps"]
    if opt_config["lr_schedule"] == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, lr, warmup, max(num_train_steps, warmup + 1), end_value=0.1 * lr
        )
    elif opt_config["lr_schedule"] == "constant":
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
        )
    else:
        raise ValueError(
            f"unknown lr_schedule {opt_config['lr_schedule']!r}; valid: cosine, constant"
        )
    return optax.adamw(
        schedule, b1=opt_config["b1"], b2=opt_config["b2"], weight_decay=opt_config["weight_decay"]
    )


def groups_from_config(config, names: Sequence[str]) -> dict[str, ParamGroup]:
    """The groups `names` with `config.optimizer` and `config.ema_decay`, each overridden by the
    fields `config.param_groups.<name>` sets (None: not set), e.g.
    `--config.param_groups.text_encoder.learning_rate=1e-4`, `...ema_decay=0` (no EMA copy)."""
    overrides = dict(config.get("param_groups", None) or {})
    # A placeholder left unset is no override: a config may offer a group an option turns on
    # (the LoRA objective's text_encoder_lora).
    unknown = sorted(
        name
        for name, fields in overrides.items()
        if name not in names and any(v is not None for v in dict(fields or {}).values())
    )
    if unknown:
        raise ValueError(
            f"config.param_groups names {unknown}, which this objective does not train; "
            f"its groups: {', '.join(names)}"
        )
    groups = {}
    for name in names:
        given = {k: v for k, v in dict(overrides.get(name) or {}).items() if v is not None}
        bad = sorted(set(given) - set(OPTIMIZER_FIELDS) - {"ema_decay"})
        if bad:
            raise ValueError(
                f"config.param_groups.{name} sets {bad}; valid: "
                f"{', '.join(OPTIMIZER_FIELDS + ('ema_decay',))}"
            )
        ema_decay = float(given.pop("ema_decay", config.ema_decay))
        opt = {k: config.optimizer[k] for k in OPTIMIZER_FIELDS} | given
        groups[name] = ParamGroup(make_optimizer(opt, config.num_train_steps), ema_decay)
    return groups


def init_state(params: Mapping[str, Any], groups: Mapping[str, ParamGroup], frozen=None):
    """A fresh TrainState: params {group: tree} for exactly the `groups`."""
    if set(params) != set(groups):
        raise ValueError(f"parameter groups {sorted(params)} vs optimizers for {sorted(groups)}")
    params = dict(params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params={g: params[g] for g, group in groups.items() if group.ema_decay},
        opt_state={g: group.optimizer.init(params[g]) for g, group in groups.items()},
        frozen=frozen,
        num_skipped=jnp.zeros((), jnp.int32),
        nonfinite_streak=jnp.zeros((), jnp.int32),
    )


# --- The update ----------------------------------------------------------------------------------


def _gradients(loss_fn, grad_accum_steps: int):
    """(params, context, batch, rng) -> ((loss, aux), grads in params), over k micro-batches when
    k > 1:
    example i goes to micro-batch i mod k (so each stays spread over every device), they run one
    after another in a `lax.scan` and their losses and gradients are averaged; micro-batch j
    draws its noise from fold_in(rng, j)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    k = grad_accum_steps
    if k < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {k}")
    if k == 1:
        return grad_fn

    def micro(x):  # [B, ...] -> [k, B/k, ...], micro-batch j = examples j, j + k, ...
        if x.shape[0] % k:
            raise ValueError(
                f"batch of {x.shape[0]} does not split into grad_accum_steps={k} micro-batches"
            )
        x = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
        return sharding_lib.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

    def accumulated(params, context, batch, rng):
        def body(acc, xs):
            j, micro_batch = xs
            out = grad_fn(params, context, micro_batch, jax.random.fold_in(rng, j))
            return jax.tree.map(jnp.add, acc, out), None

        micro_batches = jax.tree.map(micro, batch)
        first = jax.tree.map(lambda x: x[0], micro_batches)
        shapes = jax.eval_shape(grad_fn, params, context, first, rng)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        total, _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro_batches))
        return jax.tree.map(lambda x: x / k, total)  # loss, aux means and gradients: averages

    return accumulated


def as_phases(loss_or_phases, groups: Mapping[str, ParamGroup], grad_clip_norm=None):
    """A loss function (one phase over every group, clipped to grad_clip_norm) or phases."""
    if callable(loss_or_phases):
        return (Phase(loss_or_phases, tuple(groups), grad_clip_norm),)
    phases = tuple(loss_or_phases)
    for phase in phases:
        unknown = sorted(set(phase.groups) - set(groups))
        if unknown or not phase.groups:
            raise ValueError(f"phase {phase.name!r} trains {phase.groups}; groups: {list(groups)}")
    return phases


def make_update_fn(
    phases: Sequence[Phase],
    groups: Mapping[str, ParamGroup],
    seed: int,
    *,
    grad_accum_steps: int = 1,
    mesh=None,
    rules=sharding_lib.DEFAULT_RULES,
):
    """The phases into a pure update step (state, batch) -> (state, metrics).

    Non-finite losses, gradients or updated parameters skip the update: the state is returned
    unchanged but for its step count and skip counters, so a state -- and so a checkpoint -- never
    holds NaNs. metrics: each phase's loss, grad_norm (before clipping) and aux values,
    `skipped_updates` (total so far) and `nonfinite_streak` (skips in a row ending at this
    step), all scalars. mesh / rules: activations named in the models (`sharding.constrain`)
    are pinned to this mesh while the step is traced.
    """
    phases = as_phases(phases, groups)
    gradients = [_gradients(phase_loss(p), grad_accum_steps) for p in phases]

    def update(state: TrainState, batch):
        with sharding_lib.activation_sharding(mesh, rules):
            return _update(state, batch)

    def _update(state: TrainState, batch):
        step_key = jax.random.fold_in(jax.random.key(seed), state.step)
        params, opt_state = dict(state.params), dict(state.opt_state)
        metrics, finite = {}, jnp.bool_(True)
        for i, (phase, grads_of) in enumerate(zip(phases, gradients)):
            rng = step_key
            if i:
                rng = jax.random.key(seed)
                rng = jax.random.fold_in(jax.random.fold_in(rng, PHASE_KEY_OFFSET + i), state.step)
            own = {g: params[g] for g in phase.groups}
            (loss, aux), grads = grads_of(own, (params, state.frozen), batch, rng)
            grad_norm = optax.tree.norm(grads)
            if phase.grad_clip_norm is not None:
                grads, _ = optax.clip_by_global_norm(phase.grad_clip_norm).update(grads, None)
            for g in phase.groups:
                updates, opt_state[g] = groups[g].optimizer.update(grads[g], opt_state[g], own[g])
                params[g] = optax.apply_updates(own[g], updates)
            finite &= jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            prefix = f"{phase.name}_" if i else ""
            metrics |= {
                f"{prefix}{k}": v for k, v in {"loss": loss, "grad_norm": grad_norm}.items()
            }
            metrics |= {f"{prefix}{k}": v for k, v in aux.items()}
        finite &= jnp.isfinite(optax.tree.norm(params))
        # EMA with the usual warmup (decay grows as (1+n)/(10+n)) so early EMA is not all init.
        n = state.step.astype(jnp.float32)
        ema = {}
        for g, average in state.ema_params.items():
            decay = jnp.minimum(groups[g].ema_decay, (1.0 + n) / (10.0 + n))
            ema[g] = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, average, params[g])
        candidate = state.replace(params=params, ema_params=ema, opt_state=opt_state)
        # One conditional, not a select per leaf of params, EMA and optimizer state: the same
        # values, and XLA compiles ~12% less (the smoke LDM step: 7.5 -> 6.6 s on 2 CPU cores).
        kept = jax.lax.cond(finite, lambda: candidate, lambda: state)
        skipped = (~finite).astype(jnp.int32)
        # The step counts batches consumed, skipped or not, so data and noise stay in step.
        new = kept.replace(
            step=state.step + 1,
            num_skipped=state.num_skipped + skipped,
            nonfinite_streak=(state.nonfinite_streak + 1) * skipped,
        )
        metrics |= {
            "finite": finite,
            "skipped_updates": new.num_skipped,
            "nonfinite_streak": new.nonfinite_streak,
        }
        return new, metrics

    return update


def phase_loss(phase: Phase):
    """(own groups, (all params, frozen), batch, rng) -> the phase's loss, differentiable in the
    first argument: its groups replace theirs in `params`."""

    def loss(own, context, batch, rng):
        params, frozen = context
        return phase.loss_fn({**params, **own}, frozen, batch, rng)

    return loss


def jit_update_fn(config, phases, groups, mesh, rules, state_shardings):
    """The update step as `loop.run` compiles it: `make_update_fn` with the config's seed and
    micro-batches (a lone loss function clipped to `config.optimizer.grad_clip_norm`), jitted with the declared state and batch shardings, replicated metrics, and
    the old state donated. On CPU devices, XLA compiles it with `config.cpu_compiler_options`
    (XLA DebugOptions fields, e.g. XLA:CPU tuning). A mesh that splits data, fsdp and tensor at
    once switches the process to GSPMD (`sharding.avoid_shardy_conv_gradient_bug`)."""
    sharding_lib.avoid_shardy_conv_gradient_bug(mesh)
    phases = as_phases(phases, groups, config.optimizer.get("grad_clip_norm"))
    options = dict(config.get("cpu_compiler_options", None) or {})
    on_cpu = mesh.devices.flat[0].platform == "cpu"
    update = make_update_fn(
        phases,
        groups,
        config.seed,
        grad_accum_steps=config.get("grad_accum_steps", 1),
        mesh=mesh,
        rules=rules,
    )
    return jax.jit(
        update,
        in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
        donate_argnums=(0,),
        compiler_options=options if on_cpu and options else None,
    )


# --- Checkpoints written before parameter groups -------------------------------------------------


def legacy_abstract(abstract: TrainState, groups: Mapping[str, ParamGroup]) -> TrainState:
    """The layout checkpoints had before parameter groups, for the groups of `abstract`: one
    params tree (the one group's tree, or {group: tree} for several), its EMA, and the state of
    `optax.chain(clip_by_global_norm, adamw)` over it. Restored into this target,
    `from_legacy` turns it into the grouped state."""
    names = list(groups)
    merged = abstract.params[names[0]] if len(names) == 1 else dict(abstract.params)
    old = optax.chain(optax.clip_by_global_norm(1.0), groups[names[0]].optimizer)
    return abstract.replace(
        params=merged, ema_params=merged, opt_state=jax.eval_shape(old.init, merged)
    )


def from_legacy(old: TrainState, groups: Mapping[str, ParamGroup]) -> TrainState:
    """A state restored into `legacy_abstract`'s layout, by group. Every group then has the EMA
    the old state kept for all of them (a group configured without one drops it)."""
    names = list(groups)

    def by_group(tree, name):
        if len(names) == 1:
            return tree
        # The optimizer state's moments are trees like params: take this group's subtree.
        is_params = lambda x: isinstance(x, dict) and set(x) == set(names)
        return jax.tree.map(lambda x: x[name] if is_params(x) else x, tree, is_leaf=is_params)

    return old.replace(
        params={g: by_group(old.params, g) for g in names},
        ema_params={g: by_group(old.ema_params, g) for g in names if groups[g].ema_decay},
        # Leaves the groups share (the step counts) are copied: a donated state must not hold
        # one buffer twice.
        opt_state={
            g: by_group(old.opt_state[1], g)
            if i == 0
            else jax.tree.map(jnp.copy, by_group(old.opt_state[1], g))
            for i, g in enumerate(names)
        },
    )
