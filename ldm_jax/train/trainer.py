"""`train_and_evaluate(config, workdir)`: the objective the config's `stage` names, run by the loop.

  ldm-jax train --config configs/shapes.py:ldm --workdir runs/shapes/ldm ...

The objective (`ldm_jax/train/objectives/`) builds the model, batches and loss and names its
trainable groups; here each group gets its optimizer and EMA from the config, and the loop
(`loop.run`: resume, updates, faults, samples, checkpoints) is given them.
"""

from __future__ import annotations

import logging
import pathlib

from ldm_jax.train import loop, objectives
from ldm_jax.train.state import TrainState, groups_from_config

log = logging.getLogger("ldm_jax")


def train_and_evaluate(config, workdir: str | pathlib.Path) -> TrainState:
    workdir = pathlib.Path(workdir)
    build = objectives.get(config.stage)
    task = build(config, workdir)
    groups = groups_from_config(config, task.groups)
    log.info(
        "%s: training %s",
        config.stage,
        ", ".join(f"{g} (EMA {groups[g].ema_decay:g})" for g in task.groups),
    )
    state = loop.run(
        config,
        workdir,
        init_fn=task.init_fn,
        init_args=task.init_args,
        phases=task.phases,
        groups=groups,
        batches=task.batches,
        signature=task.signature,
        on_sample=task.on_sample,
        frozen_fingerprint=task.frozen_fingerprint,
    )
    if task.finish is not None:
        task.finish(state)
    return state
