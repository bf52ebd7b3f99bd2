"""The step loop every objective runs in: restore or init, update, log, sample, checkpoint.

The update (`state.make_update_fn`: parameter groups, their optimizers and EMAs, phases) is a pure
function `(state, batch) -> (state, metrics)` compiled once with explicit shardings and the state
donated. The per-step PRNG key is `fold_in(seed, step)` and the batch of a step is a pure function
of (seed, step), so a resumed run draws exactly the noise and the data an uninterrupted run would
have drawn: killed at any step and resumed, it ends bit-identical.

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
from collections.abc import Callable, Mapping
from typing import Any

import jax

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
from ldm_jax.train.state import (
    STATE_LAYOUT,
    ParamGroup,
    TrainState,
    from_legacy,
    init_state,
    jit_update_fn,
    legacy_abstract,
)

log = logging.getLogger("ldm_jax")


class NonFiniteLossError(RuntimeError):
    pass


class Preempted(Exception):
    """Raised after a preemption notice once the state is checkpointed: a clean stop, not a failure."""


def _resume_or_init(
    checkpointer, init_fn, init_args, groups, mesh, rules, signature, batches, frozen_fingerprint
) -> tuple[TrainState, Any]:
    """(state, its shardings): shapes first, then shardings from the parameters' logical axis
    names (FSDP / tensor parallel per the config's rules), then the latest complete checkpoint
    restored into them, or a fresh state initialized directly into them."""

    def init(*args):
        params, frozen = init_fn(*args)
        return init_state(params, groups, frozen)

    abstract = jax.eval_shape(init, *init_args)
    shardings = sharding_lib.tree_shardings(abstract, mesh, rules)
    latest = checkpointer.latest_step()
    if latest is None:
        return jax.jit(init, out_shardings=shardings)(*init_args), shardings
    state = _restore(checkpointer, latest, abstract, groups, mesh, rules, signature)
    meta = checkpointer.read_meta(latest)
    check_data_position(
        meta.get("data"), data_position(batches, latest), checkpointer.directory, latest
    )
    if state.frozen is None and abstract.frozen is not None:  # left out: rebuilt, checked
        saved = meta.get("frozen_fingerprint")
        if frozen_fingerprint is not None and saved != frozen_fingerprint:
            raise CheckpointMismatchError(
                f"the checkpoint in {checkpointer.directory} (step {latest}) was trained "
                f"with other frozen weights (fingerprint {saved}) "
                f"than this run's ({frozen_fingerprint}): the pretrained checkpoint changed "
                "since the run started; use the one it started from, or a fresh --workdir"
            )
        frozen = jax.jit(lambda *a: init_fn(*a)[1], out_shardings=shardings.frozen)
        state = state.replace(frozen=frozen(*init_args))
    log.info("resumed from %s at step %d", checkpointer.directory, latest)
    return state, shardings


def _report(config, writer, done: int, metrics: dict, directory, last_saved) -> None:
    """Host-side work on the metrics of update `done` (read one step late, see `run`): log
    rows, non-finite warnings, and the stop after too many skipped updates in a row."""
    values = jax.device_get(metrics)
    writer.advance(done)
    total = config.num_train_steps
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
                f"checkpoint in {directory} is intact (step {last_saved}); "
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


def _restore(checkpointer, step, abstract, groups, mesh, rules, signature) -> TrainState:
    """The state saved at `step`, in the shardings of `abstract`. The frozen groups come back
    only when the checkpoint holds them (else None: see run's frozen_fingerprint). A checkpoint
    written before parameter groups (no "state_layout" in its meta) is read in its own layout and
    regrouped; the next save writes the new one."""
    target = abstract
    legacy = checkpointer.read_meta(step).get("state_layout") is None
    if legacy:
        target = legacy_abstract(abstract, groups)
    if not checkpointer.holds(step, "frozen"):
        target = target.replace(frozen=None)
    shardings = sharding_lib.tree_shardings(target, mesh, rules)
    state, _ = checkpointer.restore(step, abstract_like(target, shardings), signature)
    if legacy:
        state = from_legacy(state, groups)
        final = sharding_lib.tree_shardings(abstract, mesh, rules)
        if state.frozen is None:
            final = final.replace(frozen=None)
        state = jax.device_put(state, final)
        log.info(
            "read step %d of %s, written before parameter groups, as groups %s",
            step,
            checkpointer.directory,
            list(groups),
        )
    return state


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
    init_fn: Callable[..., tuple[dict, Any]],
    init_args: tuple = (),
    phases,
    groups: Mapping[str, ParamGroup],
    batches,
    signature: dict,
    on_sample: Callable[[int, TrainState], pathlib.Path | None] | None = None,
    frozen_fingerprint: str | None = None,
) -> TrainState:
    """The training loop: restore or init, then update / log / sample / checkpoint until done.

    init_fn(*init_args) -> (params {group: tree}, frozen): the initial trainable groups and the
    frozen ones, run under `jax.jit` straight into the state's shardings; pretrained weights go
    in `init_args` (host arrays), not in init_fn's closure, which would compile them into the
    program as constants. groups: the optimizer and EMA of each trainable group; phases: the
    update's phases (`state.Phase`) or one loss function over every group, clipped to
    `config.optimizer.grad_clip_norm`. batches[step] -> this process's part of the batch of
    `step` (a dict of arrays, leading dimension = global batch / process count).
    Raises NonFiniteLossError after `config.max_consecutive_nonfinite` skipped updates in a row,
    and Preempted after a SIGTERM once the state of the current step boundary is saved.

    frozen_fingerprint: when given, checkpoints leave `state.frozen` out (weights init_args
    already hold, such as a fine-tuning run's pretrained VAE and text encoders) and record this
    fingerprint of them (`runs.params_fingerprint`) instead; a resume rebuilds them with
    init_fn and refuses ones with another fingerprint.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding_lib.mesh_from_config(config)
    rules = sharding_lib.rules_from_config(config)
    log.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)

    # --- State: restored from the latest complete checkpoint, or initialized. ---
    checkpointer = Checkpointer(
        workdir,
        max_to_keep=config.max_checkpoints_to_keep,
        keep_period=config.get("keep_checkpoint_every", 0),
    )
    latest = checkpointer.latest_step()
    state, state_shardings = _resume_or_init(
        checkpointer, init_fn, init_args, groups, mesh, rules, signature, batches,
        frozen_fingerprint,
    )  # fmt: skip
    if jax.process_index() == 0:
        save_config(config, workdir / "config.json")

    update = jit_update_fn(config, phases, groups, mesh, rules, state_shardings)
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
                "state_layout": STATE_LAYOUT,
            }
            if frozen_fingerprint is not None:
                meta["frozen_fingerprint"] = frozen_fingerprint
                state = state.replace(frozen=None)
            checkpointer.save(step, state, meta, force=True)
            last_saved = step

    def report(done: int, metrics: dict) -> None:
        _report(config, writer, done, metrics, checkpointer.directory, last_saved)

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
