"""What both trainers share: the train state, optimizer, the jitted update and the step loop.

The update is a pure function `(state, batch) -> (state, metrics)` compiled once with explicit
shardings and the state donated. The per-step PRNG key is `fold_in(seed, step)`, so a resumed run
draws exactly the noise an uninterrupted run would have drawn.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ldm_jax import sharding as sharding_lib
from ldm_jax.config import save_config
from ldm_jax.train.checkpointing import Checkpointer, abstract_like
from ldm_jax.train.metrics import MetricWriter

log = logging.getLogger("ldm_jax")


class NonFiniteLossError(RuntimeError):
    pass


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray  # int32 scalar: number of updates applied
    params: Any
    ema_params: Any
    opt_state: Any
    # Values carried with the model but not trained: the LDM stage's frozen VAE and latent scale.
    frozen: Any = None


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
    )


def make_update_fn(
    loss_fn: Callable, optimizer: optax.GradientTransformation, ema_decay: float, seed: int
):
    """loss_fn(params, frozen, batch, rng) -> (loss, aux metrics) into a pure update step.

    Non-finite losses, gradients or updated parameters skip the update (the state is returned
    unchanged but for its step count) and report `finite = 0`, so a state -- and so a checkpoint -- never holds NaNs.
    """

    def update(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.frozen, batch, rng
        )
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
        kept = jax.tree.map(lambda a, b: jnp.where(finite, a, b), candidate, state)
        # The step counts batches consumed, skipped or not, so data and noise stay in step.
        new = kept.replace(step=state.step + 1)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, **aux}
        return new, metrics

    return update


def run(
    config,
    workdir: str | pathlib.Path,
    *,
    init_fn: Callable[[], TrainState],
    loss_fn: Callable,
    batches,
    signature: dict,
    on_sample: Callable[[int, TrainState], pathlib.Path | None] | None = None,
) -> TrainState:
    """The training loop: restore or init, then update / log / sample / checkpoint until done.

    init_fn() -> a fresh TrainState (host arrays); batches[step] -> host batch dict.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding_lib.make_mesh(config.mesh)
    repl = sharding_lib.replicated(mesh)

    # --- State: shapes first, then restore the latest checkpoint or initialize. ---
    abstract = jax.eval_shape(init_fn)
    state_shardings = jax.tree.map(lambda _: repl, abstract)
    checkpointer = Checkpointer(workdir, max_to_keep=config.max_checkpoints_to_keep)
    latest = checkpointer.latest_step()
    if latest is not None:
        state, _ = checkpointer.restore(latest, abstract_like(abstract, state_shardings), signature)
        log.info("resumed from %s at step %d", checkpointer.directory, latest)
    else:
        state = jax.jit(init_fn, out_shardings=state_shardings)()
    if jax.process_index() == 0:
        save_config(config, workdir / "config.json")

    optimizer = make_optimizer(config.optimizer, config.num_train_steps)
    update = jax.jit(
        make_update_fn(loss_fn, optimizer, config.ema_decay, config.seed),
        in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh)),
        out_shardings=(state_shardings, repl),
        donate_argnums=(0,),
    )

    # --- Loop. ---
    start = int(state.step)
    total = config.num_train_steps
    writer = MetricWriter(workdir, config, total, start)
    meta = {"signature": signature, "stage": config.stage}
    consecutive_nonfinite = 0
    try:
        for step in range(start, total):
            batch = sharding_lib.global_batch(mesh, batches[step])
            state, metrics = update(state, batch)
            if not bool(metrics["finite"]):
                consecutive_nonfinite += 1
                log.warning(
                    "step %d: non-finite loss/gradients (loss=%s); update skipped",
                    step,
                    float(metrics["loss"]),
                )
                if consecutive_nonfinite >= config.max_consecutive_nonfinite:
                    raise NonFiniteLossError(
                        f"training stopped at step {step}: the loss or gradients were non-finite "
                        f"{consecutive_nonfinite} step(s) in a row (loss={float(metrics['loss'])}). "
                        f"The last good checkpoint in {checkpointer.directory} is intact "
                        f"(step {checkpointer.latest_step()}); lower the learning rate or check the data."
                    )
                continue
            consecutive_nonfinite = 0
            done = step + 1
            writer.advance(done)
            if done % config.log_every == 0 or done == total:
                writer.write_scalars(done, {k: v for k, v in metrics.items() if k != "finite"})
            if on_sample is not None and (done % config.sample_every == 0 or done == total):
                path = on_sample(done, state)
                if path is not None:
                    writer.write_image(done, "samples", path)
            if done % config.checkpoint_every == 0 or done == total:
                checkpointer.save(done, state, meta, force=True)
    finally:
        checkpointer.close()
        writer.close()
    return state
