"""Stage 2: text-to-image latent diffusion (Rombach et al. 2022, Sec. 3.3 and 4.3).

  ldm-jax train --config configs/shapes.py:ldm --workdir runs/shapes/ldm \
      --config.autoencoder_workdir=runs/shapes/autoencoder

The autoencoder of stage 1 is frozen. Its posterior (mean, std) for every training image is
computed once up front, and each step samples z ~ N(mean, std^2): the same distribution as
encoding every step, without the encoder's cost. Latents are multiplied by 1/std of the data's
latents (LDM, Sec. 4.3.2 and App. G), stored with the model as `frozen["latent_scale"]`. The text
encoder is trained jointly with the U-Net (LDM's text-to-image model did the same), and captions
are replaced by the empty prompt with probability `p_uncond` so one network also learns the
unconditional score for classifier-free guidance (Ho & Salimans 2022).
"""

from __future__ import annotations

import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import images as image_lib
from ldm_jax import model as model_lib
from ldm_jax import rng as rng_lib
from ldm_jax.config import read_config
from ldm_jax.data import latents as latents_lib
from ldm_jax.data.pipeline import StepIndexedBatches, load_dataset
from ldm_jax.data.tokenizers import token_ids
from ldm_jax.diffusion.objectives import denoising_loss
from ldm_jax.model import Model
from ldm_jax.models.builders import latent_size
from ldm_jax.pipeline import generate
from ldm_jax.runs import as_json, averaged_params, open_run
from ldm_jax.train.objectives import Task
from ldm_jax.train.objectives import autoencoder as autoencoder_stage

log = logging.getLogger("ldm_jax")


def signature(config) -> dict:
    """The config fields that fix the parameter shapes of this stage."""
    return {
        "autoencoder": config.autoencoder.to_dict(),
        "text_encoder": config.text_encoder.to_dict(),
        "tokenizer": config.tokenizer.to_dict(),
        "unet": config.unet.to_dict(),
        "image_size": config.data.image_size,
    }


def load_autoencoder(config):
    """EMA parameters of the stage-1 run in `config.autoencoder_workdir`, checked against config."""
    if not config.autoencoder_workdir:
        raise ValueError(
            "config.autoencoder_workdir is empty: train the autoencoder first "
            "(`ldm-jax train --config configs/shapes.py:autoencoder --workdir DIR`) and pass "
            "--config.autoencoder_workdir=DIR"
        )
    ae_dir = pathlib.Path(config.autoencoder_workdir)
    ae_config, state, _ = open_run(ae_dir, ("autoencoder",), what="the ldm stage's VAE")
    want = autoencoder_stage.signature(config)
    have = autoencoder_stage.signature(ae_config)
    if as_json(want) != as_json(have):
        raise ValueError(
            f"the autoencoder in {ae_dir} ({have}) does not match this config ({want})"
        )
    return averaged_params(state)["vae"]


def autoencoder_cpu_options(config) -> dict | None:
    """The `cpu_compiler_options` the stage-1 run in `config.autoencoder_workdir` trained with,
    when running on CPU: its encoder is the same network (None: none recorded, or not on CPU)."""
    path = pathlib.Path(config.get("autoencoder_workdir") or "") / "config.json"
    if jax.devices()[0].platform != "cpu" or not path.is_file():
        return None
    return dict(read_config(path).get("cpu_compiler_options", None) or {}) or None


def encode_dataset(
    vae, vae_params, images: np.ndarray, batch_size: int = 256, compiler_options=None
):
    """Posterior mean and std of every image: float32[N, h, w, c] each. `compiler_options`:
    jax.jit's XLA options for the encoder (None: XLA's defaults)."""
    encode = jax.jit(
        lambda p, x: vae.apply(p, x.astype(jnp.float32) / 127.5 - 1.0, method=vae.encode),
        compiler_options=compiler_options or None,
    )
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = encode(vae_params, images[start : start + batch_size])
        means.append(np.asarray(posterior.mean))
        stds.append(np.asarray(posterior.std))
    return np.concatenate(means), np.concatenate(stds)


def sample_latents(batch, frozen, rng) -> jax.Array:
    """z ~ N(mean, std^2) of the batch's posteriors, times the latent scale: f32[B, h, w, c]."""
    mean = batch["latent_mean"]
    return (mean + batch["latent_std"] * rng_lib.normal(rng, mean.shape)) * frozen["latent_scale"]


def caption_ids(config, batch, k_cap, k_drop=None, empty_ids=None) -> jax.Array:
    """Each example's canonical caption with probability config.canonical_caption_prob, else
    its other caption; with k_drop, replaced by the empty prompt with probability p_uncond."""
    b = batch["caption_ids"].shape[0]
    canonical = jax.random.bernoulli(k_cap, config.canonical_caption_prob, (b, 1))
    ids = jnp.where(canonical, batch["canonical_ids"], batch["caption_ids"])
    if k_drop is not None:
        drop = jax.random.bernoulli(k_drop, config.p_uncond, (b, 1))
        ids = jnp.where(drop, jnp.asarray(empty_ids)[None], ids)
    return ids


def make_loss_fn(ldm: Model, config, empty_ids: np.ndarray):
    schedule, prediction_type = ldm.schedule, config.diffusion.prediction_type

    def loss_fn(params, frozen, batch, rng):
        k_z, k_cap, k_drop, k_t, k_eps = jax.random.split(rng, 5)
        z = sample_latents(batch, frozen, k_z)
        b = z.shape[0]
        ids = caption_ids(config, batch, k_cap, k_drop, empty_ids)
        context = ldm.text_encoders[0].apply(params["text_encoder"], ids).last_hidden_state
        t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
        noise = rng_lib.normal(k_eps, z.shape)
        apply = lambda x_t, t: ldm.unet.apply(params["unet"], x_t, t, context)
        return denoising_loss(
            apply, z, noise, t, schedule.alphas_cumprod, prediction_type,
            config.loss_weighting, config.min_snr_gamma,
        )  # fmt: skip

    return loss_fn


def training_arrays(config, ldm: Model, vae_params) -> dict:
    """What a step of this stage (or of distillation) reads: the posterior (mean, std) of every
    training image under the frozen VAE and both captions' token ids, computed here or read
    from `ldm-jax encode`'s output."""
    if config.data.get("precomputed_latents_dir"):
        return latents_lib.load(config, vae_params)
    data = load_dataset(config)
    latent_mean, latent_std = encode_dataset(
        ldm.vae, vae_params, data["image"], compiler_options=autoencoder_cpu_options(config)
    )
    canonical = data.get("canonical_caption", data["caption"])  # shapes has two captions
    return {
        "latent_mean": latent_mean,
        "latent_std": latent_std,
        "caption_ids": token_ids(ldm.tokenizers[0], list(data["caption"])),
        "canonical_ids": token_ids(ldm.tokenizers[0], list(canonical)),
    }


def sample_grid_fn(model: Model, config, workdir: pathlib.Path):
    """on_sample(step, state) for `loop.run`: a grid of config.sample.prompts, EMA weights, with
    the run's own sampler, steps and guidance (`Model.sampling`)."""
    prompts = list(config.sample.prompts)

    def on_sample(step, state):
        current = model.with_run_params(state.averaged(), state.frozen)
        images = generate(current, prompts, seed=0, batch_size=len(prompts))
        grid = image_lib.make_grid(images, ncols=len(prompts))
        return image_lib.save_png(grid, workdir / "samples" / f"step_{step:06d}.png", 4)

    return on_sample


def build(config, workdir: str | pathlib.Path) -> Task:
    """Trainable groups "unet" and "text_encoder"; frozen: the stage-1 VAE and the latent scale
    (kept in the checkpoints, so a run samples without the autoencoder's directory)."""
    workdir = pathlib.Path(workdir)
    ldm = model_lib.from_config(config)
    vae_params = load_autoencoder(config)

    # --- Data: latents and token ids, computed once here or read from `ldm-jax encode`. ---
    arrays = training_arrays(config, ldm, vae_params)
    latent_scale = latents_lib.latent_scale(
        arrays["latent_mean"], arrays["latent_std"], config.seed
    )
    log.info("latent scale factor 1/std = %.5f", latent_scale)
    batches = StepIndexedBatches(arrays, config.batch_size, config.seed)
    empty_ids = ldm.tokenizers[0]([""])[0]

    # --- Model. ---
    lat, ch = latent_size(config), config.autoencoder.latent_channels

    def init_fn():
        k_text, k_unet = jax.random.split(jax.random.key(config.seed))
        ids = jnp.zeros((1, ldm.tokenizers[0].context_length), jnp.int32)
        text_params = ldm.text_encoders[0].init(k_text, ids)
        context = jnp.zeros((1, ldm.tokenizers[0].context_length, config.text_encoder.hidden_size))
        unet_params = ldm.unet.init(k_unet, jnp.zeros((1, lat, lat, ch)), jnp.zeros((1,)), context)
        frozen = {"vae": vae_params, "latent_scale": jnp.asarray(latent_scale)}
        return {"unet": unet_params, "text_encoder": text_params}, frozen

    return Task(
        groups=("unet", "text_encoder"),
        init_fn=init_fn,
        phases=make_loss_fn(ldm, config, empty_ids),
        batches=batches,
        signature=signature(config),
        on_sample=sample_grid_fn(ldm, config, workdir),
    )
