"""What both trainers share: the train state, optimizer, the jitted update and the step loop.

The update is a pure function `(state, batch) -> (state, metrics)` compiled once with explicit
shardings and the state donated. The per-step PRNG key is `fold_in(seed, step)` and the batch of a
step is a pure function of (seed, step), so a resumed run draws exactly the noise and the data an
uninterrupted run would have drawn: killed at any step and resumed, it ends bit-identical.

Faults the loop handles (see tests/test_faults.py):
- a non-finite loss, gradient or update: the update is skipped on device, counted
  (`skipped_updates`), and `max_consecutive_nonfinite` skips in a row stop the run;
- SIGTERM (a preemption notice): a checkpoint at the next step boundary, then `Preempted`, which
  the CLI turns into a clean exit; with several processes JAX's preemption sync manager picks the
  step all of them save at;
- a crash or SIGKILL: the next run resumes from the last complete checkpoint (orbax ignores and
  deletes partial ones) and rewinds metrics.jsonl to it.
"""

from __future__ import annotations

import logging
import pathlib
import signal
import threading
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ldm_jax import distributed
from ldm_jax import sharding as sharding_lib
from ldm_jax.config import save_config
from ldm_jax.runs import (
    Checkpointer,
    CheckpointMismatchError,
    abstract_like,
    check_data_position,
    data_position,
)
from ldm_jax.train.metrics import MetricWriter

log = logging.getLogger("ldm_jax")


class NonFiniteLossError(RuntimeError):
    pass


class Preempted(Exception):
    """Raised after a preemption notice once the state is checkpointed: a clean stop, not a failure."""


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray  # int32 scalar: number of updates applied
    params: Any
    ema_params: Any
    opt_state: Any
    # Values carried with the model but not trained: the LDM stage's frozen VAE and latent scale.
    frozen: Any = None
    num_skipped: Any = None  # int32 scalar: updates skipped for non-finite values, in total
    nonfinite_streak: Any = None  # int32 scalar: ... of them in a row up to this step


def make_optimizer(opt_config, num_train_steps: int) -> optax.GradientTransformation:
    """AdamW with linear warmup, optional cosine decay to 10%, and global-norm clipping."""
    lr, warmup = opt_config.learning_rate, opt_config.warmup_steps
    if opt_config.lr_schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, lr, warmup, max(num_train_steps, warmup + 1), end_value=0.1 * lr
        )
    elif opt_config.lr_schedule == "constant":
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
        )
    else:
        raise ValueError(f"unknown lr_schedule {opt_config.lr_schedule!r}; valid: cosine, constant")
    return optax.chain(
        optax.clip_by_global_norm(opt_config.grad_clip_norm),
        optax.adamw(
            schedule, b1=opt_config.b1, b2=opt_config.b2, weight_decay=opt_config.weight_decay
        ),
    )


def init_state(params, optimizer, frozen=None) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=params,
        opt_state=optimizer.init(params),
        frozen=frozen,
        num_skipped=jnp.zeros((), jnp.int32),
        nonfinite_streak=jnp.zeros((), jnp.int32),
    )


def make_update_fn(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    ema_decay: float,
    seed: int,
    *,
    grad_accum_steps: int = 1,
    mesh=None,
    rules=sharding_lib.DEFAULT_RULES,
):
    """loss_fn(params, frozen, batch, rng) -> (loss, aux metrics) into a pure update step.

    Non-finite losses, gradients or updated parameters skip the update: the state is returned
    unchanged but for its step count and skip counters, so a state -- and so a checkpoint -- never
    holds NaNs. metrics: loss, grad_norm, the aux values, `skipped_updates` (total so far) and
    `nonfinite_streak` (skips in a row ending at this step), all scalars.

    grad_accum_steps = k > 1 splits the batch into k micro-batches (example i goes to micro-batch
    i mod k, so each stays spread over every device), runs them one after another in a
    `lax.scan` and averages their losses and gradients: one update of the whole batch with the
    activation memory of one micro-batch. Micro-batch j draws its noise from
    fold_in(step key, j). mesh / rules: activations named in the models (`sharding.constrain`)
    are pinned to this mesh while the step is traced.
    """
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def loss_and_grads(params, frozen, batch, rng):
        if grad_accum_steps == 1:
            return grad_fn(params, frozen, batch, rng)
        k = grad_accum_steps

        def micro(x):  # [B, ...] -> [k, B/k, ...], micro-batch j = examples j, j + k, ...
            if x.shape[0] % k:
                raise ValueError(
                    f"batch of {x.shape[0]} does not split into grad_accum_steps={k} micro-batches"
                )
            x = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
            return sharding_lib.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

        def body(acc, xs):
            j, micro_batch = xs
            out = grad_fn(params, frozen, micro_batch, jax.random.fold_in(rng, j))
            return jax.tree.map(jnp.add, acc, out), None

        micro_batches = jax.tree.map(micro, batch)
        first = jax.tree.map(lambda x: x[0], micro_batches)
        shapes = jax.eval_shape(grad_fn, params, frozen, first, rng)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        total, _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro_batches))
        return jax.tree.map(lambda x: x / k, total)  # loss, aux means and gradients: averages

    def update(state: TrainState, batch):
        with sharding_lib.activation_sharding(mesh, rules):
            return _update(state, batch)

    def _update(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        (loss, aux), grads = loss_and_grads(state.params, state.frozen, batch, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # EMA with the usual warmup (decay grows as (1+n)/(10+n)) so early EMA is not all init.
        n = state.step.astype(jnp.float32)
        decay = jnp.minimum(ema_decay, (1.0 + n) / (10.0 + n))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        grad_norm = optax.tree.norm(grads)
        finite = (
            jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(params))
        )
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
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            **aux,
            "finite": finite,
            "skipped_updates": new.num_skipped,
            "nonfinite_streak": new.nonfinite_streak,
        }
        return new, metrics

    return update


def jit_update_fn(config, loss_fn: Callable, mesh, rules, state_shardings):
    """The trainers' update step as `run` compiles it: `make_update_fn` with the config's
    optimizer, EMA, seed and micro-batches, jitted with the declared state and batch shardings,
    replicated metrics, and the old state donated. On CPU devices, XLA compiles it with
    `config.cpu_compiler_options` (XLA DebugOptions fields, e.g. XLA:CPU tuning). A mesh that
    splits data, fsdp and tensor at once switches the process to GSPMD
    (`sharding.avoid_shardy_conv_gradient_bug`)."""
    sharding_lib.avoid_shardy_conv_gradient_bug(mesh)
    optimizer = make_optimizer(config.optimizer, config.num_train_steps)
    options = dict(config.get("cpu_compiler_options", None) or {})
    on_cpu = mesh.devices.flat[0].platform == "cpu"
    return jax.jit(
        make_update_fn(
            loss_fn,
            optimizer,
            config.ema_decay,
            config.seed,
            grad_accum_steps=config.get("grad_accum_steps", 1),
            mesh=mesh,
            rules=rules,
        ),
        in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
        donate_argnums=(0,),
        compiler_options=options if on_cpu and options else None,
    )


class PreemptionNotice:
    """SIGTERM (the notice schedulers send before evicting a job) as a request to stop cleanly.

    One process: a Python SIGTERM handler sets a flag; the previous handler is restored on close.
    Several processes: `jax.distributed.initialize` starts JAX's preemption sync manager, which
    catches SIGTERM on whichever host gets it and picks a step every host reaches; orbax's
    `reached_preemption(step)` asks it. (A Python handler there would replace the manager's.)
    """

    def __init__(self, checkpointer: Checkpointer):
        self.checkpointer = checkpointer
        self.received = False
        self.multiprocess = jax.process_count() > 1
        self._installed = False
        if not self.multiprocess and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self.received = True

    def reached(self, step: int) -> bool:
        """True at the step boundary where every process should checkpoint and stop."""
        if self.multiprocess:
            return self.checkpointer.manager.reached_preemption(step)
        return self.received

    def close(self) -> None:
        if self._installed:
            previous = self._previous if self._previous is not None else signal.SIG_DFL
            signal.signal(signal.SIGTERM, previous)
            self._installed = False


def run(
    config,
    workdir: str | pathlib.Path,
    *,
    init_fn: Callable[..., TrainState],
    init_args: tuple = (),
    loss_fn: Callable,
    batches,
    signature: dict,
    on_sample: Callable[[int, TrainState], pathlib.Path | None] | None = None,
    frozen_fingerprint: str | None = None,
) -> TrainState:
    """The training loop: restore or init, then update / log / sample / checkpoint until done.

    init_fn(*init_args) -> a fresh TrainState, run under `jax.jit` straight into the state's
    shardings; pretrained weights go in `init_args` (host arrays), not in init_fn's closure, which
    would compile them into the program as constants. batches[step] -> this process's part of the
    batch of `step` (a dict of arrays, leading dimension = global batch / process count).
    Raises NonFiniteLossError after `config.max_consecutive_nonfinite` skipped updates in a row,
    and Preempted after a SIGTERM once the state of the current step boundary is saved.

    frozen_fingerprint: when given, checkpoints leave `state.frozen` out (weights init_args
    already hold, such as a fine-tuning run's pretrained VAE and text encoders) and record this
    fingerprint of them (`checkpointing.params_fingerprint`) instead; a resume rebuilds them with
    init_fn and refuses ones with another fingerprint.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding_lib.mesh_from_config(config)
    rules = sharding_lib.rules_from_config(config)
    log.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)

    # --- State: shapes first, then shardings from the parameters' logical axis names (FSDP /
    # tensor parallel per config.sharding_rules), then restore the latest complete checkpoint
    # or initialize directly into those shardings. ---
    abstract = jax.eval_shape(init_fn, *init_args)
    state_shardings = sharding_lib.tree_shardings(abstract, mesh, rules)
    checkpointer = Checkpointer(
        workdir,
        max_to_keep=config.max_checkpoints_to_keep,
        keep_period=config.get("keep_checkpoint_every", 0),
    )
    latest = checkpointer.latest_step()
    if latest is not None:
        # A checkpoint holds the state less what init_args rebuild (see frozen_fingerprint);
        # checkpoints written before frozen weights were left out still hold them.
        holds_frozen = checkpointer.holds(latest, "frozen")
        target, target_shardings = abstract, state_shardings
        if not holds_frozen:
            target, target_shardings = (t.replace(frozen=None) for t in (target, target_shardings))
        state, meta = checkpointer.restore(
            latest, abstract_like(target, target_shardings), signature
        )
        check_data_position(
            meta.get("data"), data_position(batches, latest), checkpointer.directory, latest
        )
        if not holds_frozen and frozen_fingerprint is not None:
            if meta.get("frozen_fingerprint") != frozen_fingerprint:
                raise CheckpointMismatchError(
                    f"the checkpoint in {checkpointer.directory} (step {latest}) was trained "
                    f"with other frozen weights (fingerprint {meta.get('frozen_fingerprint')}) "
                    f"than this run's ({frozen_fingerprint}): the pretrained checkpoint changed "
                    "since the run started; use the one it started from, or a fresh --workdir"
                )
            frozen = jax.jit(lambda *a: init_fn(*a).frozen, out_shardings=state_shardings.frozen)
            state = state.replace(frozen=frozen(*init_args))
        log.info("resumed from %s at step %d", checkpointer.directory, latest)
    else:
        state = jax.jit(init_fn, out_shardings=state_shardings)(*init_args)
    if jax.process_index() == 0:
        save_config(config, workdir / "config.json")

    update = jit_update_fn(config, loss_fn, mesh, rules, state_shardings)
    if jax.process_count() > 1 and config.num_train_steps > int(state.step):
        # Compile before the first collective, then wait for the slowest process (see barrier).
        first = sharding_lib.global_batch(mesh, batches[int(state.step)])
        update = update.lower(state, first).compile()
        distributed.barrier("train_loop_start")

    # --- Loop. ---
    start = int(state.step)
    total = config.num_train_steps
    writer = MetricWriter(workdir, config, total, start)
    preemption = PreemptionNotice(checkpointer)
    last_saved = latest

    def save(step: int, state: TrainState) -> None:
        nonlocal last_saved
        if step != last_saved:
            meta = {
                "signature": signature,
                "stage": config.stage,
                "data": data_position(batches, step),
            }
            if frozen_fingerprint is not None:
                meta["frozen_fingerprint"] = frozen_fingerprint
                state = state.replace(frozen=None)
            checkpointer.save(step, state, meta, force=True)
            last_saved = step

    def report(done: int, metrics: dict) -> None:
        """Host-side work on the metrics of update `done` (read one step late, see below)."""
        values = jax.device_get(metrics)
        writer.advance(done)
        streak = int(values["nonfinite_streak"])
        if done % config.log_every == 0 or done == total or streak:
            hidden = ("finite", "nonfinite_streak")
            writer.write_scalars(done, {k: v for k, v in values.items() if k not in hidden})
        if streak:
            log.warning(
                "step %d: non-finite loss/gradients (loss=%s); update skipped (%d so far)",
                done - 1,
                float(values["loss"]),
                int(values["skipped_updates"]),
            )
            if streak >= config.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"training stopped at step {done - 1}: the loss or gradients were non-finite "
                    f"{streak} step(s) in a row (loss={float(values['loss'])}). The last good "
                    f"checkpoint in {checkpointer.directory} is intact (step {last_saved}); "
                    "lower the learning rate or check the data."
                )
        if done == total:
            log.info(
                "process %d of %d: step %d loss %r",
                jax.process_index(),
                jax.process_count(),
                done,
                float(values["loss"]),
            )

    # The metrics of update s are read after update s+1 is dispatched: reading them at once
    # would make the host wait for the device every step, and the next batch's loading and
    # transfer would no longer overlap with the computation.
    pending = None
    try:
        for step in range(start, total):
            if preemption.reached(step):
                if pending is not None:
                    report(*pending)
                save(step, state)
                checkpointer.wait_until_finished()
                raise Preempted(
                    f"preemption notice (SIGTERM): saved step {step} of {total} to "
                    f"{checkpointer.directory}; run the same command again to resume"
                )
            batch = sharding_lib.global_batch(mesh, batches[step])
            state, metrics = update(state, batch)
            if pending is not None:
                report(*pending)
            done = step + 1
            pending = (done, metrics)
            if on_sample is not None and (done % config.sample_every == 0 or done == total):
                path = on_sample(done, state)
                if path is not None:
                    writer.write_image(done, "samples", path)
            if done % config.checkpoint_every == 0 or done == total:
                save(done, state)
        if pending is not None:
            report(*pending)
    finally:
        preemption.close()
        checkpointer.close()
        writer.close()
    return state
