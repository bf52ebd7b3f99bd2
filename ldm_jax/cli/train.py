"""`ldm-jax train`: the objective a config's stage names (`ldm_jax.train.objectives`), trained."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("ldm_jax")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train the objective a config's stage names (autoencoder, ldm, ...)"
    )
    p.add_argument("--config", required=True, help="configs/<name>.py[:arg]")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics and samples go here")
    p.set_defaults(fn=run, takes_overrides=True)


def run(args, overrides):
    from ldm_jax.config import load_config

    config = load_config(args.config, overrides)
    from ldm_jax import distributed

    distributed.initialize(config)  # joins a multi-host run, if any; before any JAX computation
    from ldm_jax.train.trainer import train_and_evaluate

    start = time.perf_counter()
    train_and_evaluate(config, args.workdir)
    log.info(
        "%s training done in %.1f s; workdir %s",
        config.stage,
        time.perf_counter() - start,
        args.workdir,
    )
