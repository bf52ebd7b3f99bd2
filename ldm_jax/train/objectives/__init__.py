"""Training objectives, one module each, registered by name (the config's `stage`).

An objective is a function `build(config, workdir) -> Task`: it loads or builds the model, the
batches and the loss, and says which parameter groups it trains and which it keeps frozen.
`ldm_jax.train.trainer.train_and_evaluate` gives each trainable group its optimizer and EMA
(`config.optimizer`, `config.ema_decay`, `config.param_groups.<group>`) and runs the loop.

Adding one: a module here with `build`, a line in OBJECTIVES (or `register(name, build)` from
your own code), a config whose `stage` is the name, and its tests.
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

# name -> "module:function"; modules are imported when their objective is asked for (so an
# objective's heavy imports cost nothing to the others).
OBJECTIVES: dict[str, str | Callable] = {
    "autoencoder": "ldm_jax.train.objectives.autoencoder:build",  # VAE: reconstruction + KL
    "ldm": "ldm_jax.train.objectives.ldm:build",  # text-to-image denoising from scratch
    "finetune": "ldm_jax.train.objectives.finetune:build",  # denoising on a pretrained model
    "distill": "ldm_jax.train.objectives.distill:build",  # progressive distillation
    "lora": "ldm_jax.train.objectives.lora:build",  # a LoRA of a pretrained or trained model
}


@dataclasses.dataclass(frozen=True)
class Task:
    """What an objective hands the trainer.

    init_fn(*init_args) -> (params {group: tree} for `groups`, frozen {name: tree} or None);
    pretrained weights belong in init_args (host arrays), not in init_fn's closure.
    phases: one loss function loss_fn(params, frozen, batch, rng) -> (loss, aux) over every
    group, or a sequence of `state.Phase` (e.g. generator, then discriminator).
    batches[step] -> this process's part of the batch of `step`.
    signature: what fixes the state's shapes (a resume with another is refused).
    on_sample(step, state) -> an image path (or None), every `config.sample_every` steps.
    frozen_fingerprint: leave the frozen groups out of checkpoints, resumes check them against
    this (see `loop.run`). finish(state): after the last step (e.g. an export).
    """

    groups: Sequence[str]
    init_fn: Callable[..., tuple[dict, Any]]
    phases: Any
    batches: Any
    signature: dict
    init_args: tuple = ()
    on_sample: Callable | None = None
    frozen_fingerprint: str | None = None
    finish: Callable | None = None


def register(name: str, build: str | Callable[[Any, pathlib.Path], Task]) -> None:
    """Make `build` (a function or "module:function") the objective of configs with this stage."""
    OBJECTIVES[name] = build


def get(name: str) -> Callable[[Any, pathlib.Path], Task]:
    """The `build` function of the objective `name`."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown stage {name!r}; valid: {', '.join(OBJECTIVES)}")
    target = OBJECTIVES[name]
    if callable(target):
        return target
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)
