"""Stage 1: the AutoencoderKL (Rombach et al. 2022, Sec. 3), reconstruction + KL.

  ldm-jax train --config configs/shapes.py:autoencoder --workdir runs/shapes/autoencoder

The LDM paper adds a perceptual (LPIPS) and a patch-adversarial term; the config keeps their
weights (`autoencoder_loss.lpips_weight`, `.discriminator_weight`) so a later issue can add them
without changing this file's shape; here only 0 is accepted.
"""

from __future__ import annotations

import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import images as image_lib
from ldm_jax.data.pipeline import StepIndexedBatches, load_dataset
from ldm_jax.models.builders import autoencoder_signature as signature
from ldm_jax.models.builders import build_autoencoder
from ldm_jax.models.vae import AutoencoderKL
from ldm_jax.train.objectives import Task

log = logging.getLogger("ldm_jax")


def make_loss_fn(model: AutoencoderKL, loss_config):
    if loss_config.lpips_weight or loss_config.discriminator_weight:
        raise NotImplementedError(
            "LPIPS and adversarial autoencoder losses are not implemented yet"
        )
    if loss_config.reconstruction not in ("l1", "l2"):
        raise ValueError(
            f"unknown reconstruction loss {loss_config.reconstruction!r}; valid: l1, l2"
        )

    def loss_fn(params, frozen, batch, rng):
        """params: {"vae": the VAE's variables}."""
        del frozen
        params = params["vae"]
        x = batch["image"].astype(jnp.float32) / 127.5 - 1.0
        posterior = model.apply(params, x, method=model.encode)
        recon = model.apply(params, posterior.sample(rng), method=model.decode)
        err = recon - x
        rec = jnp.mean(jnp.abs(err)) if loss_config.reconstruction == "l1" else jnp.mean(err**2)
        kl = jnp.mean(posterior.kl())
        loss = rec + loss_config.kl_weight * kl
        return loss, {"reconstruction": rec, "kl": kl}

    return loss_fn


def build(config, workdir: str | pathlib.Path) -> Task:
    """The VAE as one trainable group, "vae"; nothing frozen."""
    workdir = pathlib.Path(workdir)
    data = load_dataset(config)
    batches = StepIndexedBatches({"image": data["image"]}, config.batch_size, config.seed)
    model = build_autoencoder(config)
    size = config.data.image_size

    def init_fn():
        x = jnp.zeros((1, size, size, 3), jnp.float32)
        params = model.init(jax.random.key(config.seed), x)  # the full forward: encoder + decoder
        return {"vae": params}, None

    test = load_dataset(config, "test")["image"][:16]
    reconstruct = jax.jit(
        lambda params, x: model.apply(
            params, model.apply(params, x, method=model.encode).mode(), method=model.decode
        )
    )

    def on_sample(step, state):
        params = state.averaged()["vae"]
        recon = image_lib.to_uint8(reconstruct(params, image_lib.to_model_range(test)))
        grid = image_lib.make_grid(np.concatenate([test, recon]), ncols=16)
        return image_lib.save_png(grid, workdir / "samples" / f"reconstructions_{step:06d}.png", 4)

    return Task(
        groups=("vae",),
        init_fn=init_fn,
        phases=make_loss_fn(model, config.autoencoder_loss),
        batches=batches,
        signature=signature(config),
        on_sample=on_sample,
    )
