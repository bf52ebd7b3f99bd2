"""orbax checkpoints in `<workdir>/checkpoints`, with a check that they fit the config.

Each checkpoint holds the train state and a JSON `meta` item with the model signature: the config
fields that determine parameter shapes. Restoring into a config whose signature differs is an
error naming the fields, instead of orbax's shape error deep inside a restore.
"""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    pass


class Checkpointer:
    def __init__(self, workdir: pathlib.Path, *, max_to_keep: int = 2, read_only: bool = False):
        self.directory = (pathlib.Path(workdir) / "checkpoints").absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,  # partial saves of a killed run are removed
            enable_async_checkpointing=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def read_meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

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
        """The saved state as nested dicts of arrays, without a target (for inference)."""
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
        )
        return restored["state"]

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


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
