"""Metric writers: console progress bar, a JSONL file in the workdir, and wandb (offline default).

Only process 0 writes. wandb is imported here, when a run asks for it, never by `import ldm_jax`.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time

import jax
import numpy as np

log = logging.getLogger("ldm_jax")


class MetricWriter:
    def __init__(self, workdir: pathlib.Path, config, total_steps: int, initial_step: int = 0):
        self.active = jax.process_index() == 0
        self.jsonl = None
        self.bar = None
        self.wandb_run = None
        self._last = (time.perf_counter(), initial_step)
        if not self.active:
            return
        self.jsonl = _open_log_at(workdir / "metrics.jsonl", initial_step)
        from tqdm import tqdm

        self.bar = tqdm(
            total=total_steps,
            initial=initial_step,
            desc=config.stage,
            dynamic_ncols=True,
            mininterval=1.0,
        )
        mode = config.wandb.mode
        if mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.wandb_run = wandb.init(
                project=config.wandb.project,
                entity=config.wandb.entity or None,
                mode=mode,
                dir=str(workdir),
                config=config.to_dict(),
                resume="allow",
                id=_run_id(workdir),
                name=workdir.name,
            )

    def write_scalars(self, step: int, scalars: dict) -> None:
        if not self.active:
            return
        now = time.perf_counter()
        t0, s0 = self._last
        scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
        if step > s0:
            scalars["steps_per_sec"] = (step - s0) / max(now - t0, 1e-9)
        self._last = (now, step)
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in scalars.items()}, refresh=False)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def write_image(self, step: int, name: str, path: pathlib.Path) -> None:
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({name: wandb.Image(str(path))}, step=step)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _run_id(workdir: pathlib.Path) -> str:
    """A stable wandb run id per workdir, so a resumed run continues the same wandb run."""
    path = workdir / "wandb_run_id"
    if not path.exists():
        path.write_text(os.urandom(6).hex())
    return path.read_text().strip()


def _open_log_at(path: pathlib.Path, step: int):
    """Open the JSONL log for appending after dropping rows past `step`.

    A run that died after its last checkpoint logged steps that the resumed run will redo; keeping
    them would leave duplicates, so the log always describes one trajectory. A row cut short by
    a kill (no newline, or not JSON) is dropped too.
    """
    if path.exists():
        rows = path.read_text().splitlines(keepends=True)
        kept = [r for r in rows if _row_step(r) is not None and _row_step(r) <= step]
        if len(kept) != len(rows):
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(kept))
            tmp.replace(path)
    return open(path, "a")


def _row_step(row: str) -> int | None:
    """The step of a complete JSONL row, or None for a torn or empty one."""
    if not row.endswith("\n"):
        return None
    try:
        return int(json.loads(row)["step"])
    except (ValueError, KeyError, TypeError):
        return None
