"""orbax checkpoints in `<workdir>/checkpoints`, with a check that they fit the config.

Each checkpoint holds the train state and a JSON `meta` item with the model signature (the config
fields that determine parameter shapes) and the data position (what fixes the batches from the
saved step on). Restoring into a config whose signature or data order differs is an error naming
the fields, instead of orbax's shape error deep inside a restore or a silently different run.

Saves are asynchronous: `save` returns once the arrays are copied off the devices, and the files
are written in the background; `close` waits for them. orbax writes each step into
`<step>.orbax-checkpoint-tmp-<time>` and renames it when complete, so a save cut short by a crash
leaves only such a directory: `latest_step` never returns it, and the manager deletes it on start.
"""

from __future__ import annotations

import hashlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

# orbax's default jax.Array handler writes a replicated array "replica-parallel": every replica
# writes a slice of it, cut out op by op on the devices. That spreads the writes of large
# arrays over the hosts of a data-parallel run, but for each small array (biases, norms, the
# optimizer's scalars) the slicing costs more than the write; measured ~2 s per save of the
# smoke autoencoder state on 8 CPU devices. Arrays under 1 MiB per slice are written whole.
_MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 1 << 20
ocp.type_handlers.register_type_handler(
    jax.Array,
    ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=_MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL
    ),
    override=True,
)


class CheckpointMismatchError(ValueError):
    pass


class Checkpointer:
    def __init__(
        self,
        workdir: pathlib.Path,
        *,
        max_to_keep: int | None = 2,
        keep_period: int | None = None,
        read_only: bool = False,
    ):
        """max_to_keep: newest checkpoints kept (None: all); keep_period: also keep every step
        that is a multiple of it (None/0: none), e.g. for evaluating a run's history later."""
        self.directory = (pathlib.Path(workdir) / "checkpoints").absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            keep_period=keep_period or None,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,  # partial saves of a killed run are removed
            enable_async_checkpointing=True,
        )
        # Handlers named up front, so a read-only manager can read metadata before any restore.
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def read_meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def holds(self, step: int, key: str) -> bool:
        """Whether the train state saved at `step` has a non-empty `key` (e.g. "frozen")."""
        metadata = self.manager.item_metadata(step)["state"]
        tree = getattr(metadata, "tree", metadata) or {}
        return bool(tree.get(key))

    def restore(self, step: int, abstract_state, signature: dict):
        """Restore `state` at `step` into the shapes/shardings of `abstract_state`."""
        meta = self.read_meta(step)
        saved = meta.get("signature", {})
        diffs = [
            f"{k}: checkpoint {saved.get(k)!r} vs config {signature.get(k)!r}"
            for k in sorted(set(saved) | set(signature))
            if as_json(saved.get(k)) != as_json(signature.get(k))
        ]
        if diffs:
            raise CheckpointMismatchError(
                f"the checkpoint in {self.directory} (step {step}) does not fit the config:\n  "
                + "\n  ".join(diffs)
                + "\nUse a fresh --workdir, or the config that wrote this checkpoint."
            )
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointMismatchError(
                f"the checkpoint in {self.directory} (step {step}) does not fit the config: {e}"
            ) from e
        return restored["state"], meta

    def restore_raw(self, step: int) -> dict:
        """The saved state as nested dicts of arrays on this process's first device, without a
        model to build a target from (for inference and tests).

        The target comes from the checkpoint's own metadata (shapes and dtypes) with the
        shardings replaced: without one, orbax rebuilds the saved device mesh and fails on any
        other machine, e.g. for a checkpoint written by a pod and sampled from on a workstation.
        """
        metadata = self.manager.item_metadata(step)["state"]
        if metadata is None:
            raise FileNotFoundError(f"no train state in {self.directory} at step {step}")
        tree = getattr(metadata, "tree", metadata)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
            tree,
            is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"),
        )
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        return restored["state"]

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> None:
        """Start an asynchronous save of `state` (a TrainState) and `meta` (JSON) at `step`.

        Refuses parameters with NaN/inf: the trainer skips non-finite updates, so this only
        fires on a bug, and then a checkpoint must not silently carry the damage forward.
        """
        if not all_finite(state.params):
            raise NonFiniteCheckpointError(
                f"refusing to save step {step} to {self.directory}: the parameters hold NaN or "
                "inf values"
            )
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class NonFiniteCheckpointError(RuntimeError):
    pass


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def all_finite(tree) -> bool:
    """True if no floating-point leaf of `tree` holds NaN or inf."""
    floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return bool(_all_finite(floats)) if floats else True


def data_position(batches, step: int) -> dict:
    """Where the data stands at `step`: saved in the checkpoint meta, checked on restore.

    For `StepIndexedBatches` the batch of step s is a pure function of (seed, s, global batch
    size, number of examples), so the position is the step itself plus those three: a resumed
    run with the same values provably sees the batches an uninterrupted run would have seen.
    """
    return {
        "kind": type(batches).__name__,
        "next_step": int(step),
        "seed": getattr(batches, "seed", None),
        "global_batch_size": getattr(batches, "global_batch_size", None),
        "num_examples": getattr(batches, "num_examples", None),
    }


def check_data_position(saved: dict | None, current: dict, directory, step: int) -> None:
    """Raise CheckpointMismatchError if resuming at `step` would see other batches than saved."""
    if saved is None:  # a checkpoint from before data positions were recorded
        return
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
        for k in sorted(set(saved) | set(current))
        if k != "next_step" and saved.get(k) != current.get(k)
    ]
    if saved.get("next_step") != step:
        diffs.append(f"next_step: checkpoint {saved.get('next_step')!r} vs state step {step}")
    if diffs:
        raise CheckpointMismatchError(
            f"resuming from {directory} (step {step}) would change the data order:\n  "
            + "\n  ".join(diffs)
            + "\nUse a fresh --workdir, or the seed/batch size/dataset that wrote this checkpoint."
        )


def params_fingerprint(params) -> str:
    """sha256 (16 hex digits) over a parameter tree's paths, shapes, dtypes and bytes: which
    weights these are (a VAE that encoded latents, the frozen part of a fine-tuning run)."""
    digest = hashlib.sha256()
    for path, leaf in sorted(
        jax.tree_util.tree_flatten_with_path(params)[0], key=lambda kv: jax.tree_util.keystr(kv[0])
    ):
        value = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}{value.shape}{value.dtype}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()[:16]


def as_json(value):
    """JSON round trips turn tuples into lists; compare them as equal."""
    if isinstance(value, (list, tuple)):
        return [as_json(v) for v in value]
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    return value


def abstract_like(state, shardings):
    """ShapeDtypeStructs with shardings, the restore target for `StandardRestore`."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
