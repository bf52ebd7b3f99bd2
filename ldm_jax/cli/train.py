"""`ldm-jax train`: the trainer of the stage a config names (autoencoder, ldm, finetune, distill)."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("ldm_jax")


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train the stage a config names (autoencoder or ldm)")
    p.add_argument("--config", required=True, help="configs/<name>.py[:arg]")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics and samples go here")
    p.set_defaults(fn=run, takes_overrides=True)


def run(args, overrides):
    from ldm_jax.config import load_config

    config = load_config(args.config, overrides)
    from ldm_jax import distributed

    distributed.initialize(config)  # joins a multi-host run, if any; before any JAX computation
    if config.stage == "autoencoder":
        from ldm_jax.train.autoencoder import train_and_evaluate
    elif config.stage == "ldm":
        from ldm_jax.train.ldm import train_and_evaluate
    elif config.stage == "finetune":
        from ldm_jax.train.finetune import train_and_evaluate
    elif config.stage == "distill":
        from ldm_jax.train.distill import train_and_evaluate
    else:
        raise ValueError(
            f"unknown stage {config.stage!r}; valid: autoencoder, ldm, finetune, distill"
        )
    start = time.perf_counter()
    train_and_evaluate(config, args.workdir)
    log.info(
        "%s training done in %.1f s; workdir %s",
        config.stage,
        time.perf_counter() - start,
        args.workdir,
    )
