"""A run's files: its `config.json`, orbax checkpoints in `<workdir>/checkpoints`, and the
folders that samples and evaluations are written to. Shared by the trainers, the evaluations, the
pipeline and the data layer (which reads a run's VAE), so it imports none of them.

  config, state, step = open_run("runs/shapes/ldm", stages=("ldm", "distill"))

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
import json
import logging
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger("ldm_jax")

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


class NoCheckpointError(FileNotFoundError):
    pass


def read_run_config(workdir, stages: Sequence[str] | None = None, what: str = "a training run"):
    """The config of the run in `workdir`; FileNotFoundError without one, ValueError when its
    stage is not one of `stages`. `what` names the run in the errors ("the teacher", ...)."""
    from ldm_jax.config import read_config  # ml_collections: not on every accelerator image

    workdir = pathlib.Path(workdir)
    if not (workdir / "config.json").is_file():
        raise NoCheckpointError(
            f"no checkpoint in {workdir} for {what}: no training run there (config.json "
            f"missing); train one first, e.g. `ldm-jax train --config configs/shapes.py "
            f"--workdir {workdir}`"
        )
    config = read_config(workdir / "config.json")
    if stages is not None and config.stage not in stages:
        raise ValueError(
            f"{workdir} holds a {config.stage!r} run; {what} needs {' or '.join(map(repr, stages))}"
        )
    return config


def open_run(
    workdir, stages: Sequence[str] | None = None, step: int | None = None, what="a training run"
):
    """(config, raw state dict, step) of the latest (or given) checkpoint of a run; the state's
    leaves are host arrays (`Checkpointer.restore_raw`), its params and EMA by parameter group
    (`averaged_params` reads them), whichever layout the checkpoint has."""
    config = read_run_config(workdir, stages, what)
    checkpointer = Checkpointer(pathlib.Path(workdir), read_only=True)
    step = checkpointer.latest_step() if step is None else step
    if step is None:
        raise NoCheckpointError(f"no checkpoint in {pathlib.Path(workdir) / 'checkpoints'}")
    state = checkpointer.restore_raw(step)
    group = LEGACY_SINGLE_GROUP.get(config.stage)
    if group is not None and checkpointer.read_meta(step).get("state_layout") is None:
        state = {**state, "params": {group: state["params"]}}
        state["ema_params"] = {group: state["ema_params"]}
    return config, state, step


# Stages whose checkpoints, before parameter groups (meta "state_layout" 2), held their one
# trainable group's tree itself rather than {group: tree}; the ldm and distill stages' were
# already {"unet", "text_encoder"}.
LEGACY_SINGLE_GROUP = {"autoencoder": "vae", "finetune": "unet"}


def averaged_params(state: dict) -> dict:
    """{group: EMA parameters, or the parameters of a group trained without EMA} of a raw
    state (`open_run`)."""
    ema = state.get("ema_params") or {}
    return {g: ema.get(g, p) for g, p in state["params"].items()}


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


# --- Output folders -------------------------------------------------------------------------------


def check_output_dir(path: str | pathlib.Path, flag: str = "--out") -> None:
    """FileExistsError naming `flag` when `path` is a file: `output_dir` would refuse it; checked
    before slow work (loading a checkpoint) that precedes the folder's creation."""
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{flag} {path} is a file, not a folder; choose a folder")


def output_dir(path: str | pathlib.Path, flag: str = "--out") -> pathlib.Path:
    """The folder to write outputs into, made before any work so that a bad path fails first.

    `path` when it is new or empty; when it already holds files (an earlier sample or
    evaluation), its first free numbered subfolder `path/001`, `path/002`, ..., so nothing
    written before is overwritten. A path that is a file is a FileExistsError naming `flag`.
    """
    check_output_dir(path, flag)
    path = pathlib.Path(path)
    if path.is_dir() and any(path.iterdir()):
        index = 1
        while (path / f"{index:03d}").exists():
            index += 1
        log.warning("%s %s already holds files; writing to %s", flag, path, path / f"{index:03d}")
        path = path / f"{index:03d}"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot make this folder ({e})") from e
    return path


def save_outputs(
    images: np.ndarray,
    records: list[dict],
    out_dir: str | pathlib.Path,
    grid_columns: int | None = None,
) -> pathlib.Path:
    """One PNG per image, `grid.png` and `manifest.json` (one record per image) in out_dir."""
    from ldm_jax.images import make_grid, save_png

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = []
    for i, (image, record) in enumerate(zip(images, records)):
        name = f"{i:05d}.png"
        save_png(image, out_dir / name)
        manifest.append({"file": name, **record})
    save_png(
        make_grid(images, grid_columns), out_dir / "grid.png", scale=max(1, 256 // images.shape[1])
    )
    # allow_nan=False: a NaN would make the file invalid JSON (generate refuses them anyway).
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    return out_dir
