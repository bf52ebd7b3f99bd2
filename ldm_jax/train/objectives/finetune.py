"""Fine-tuning the U-Net of a pretrained Stable Diffusion checkpoint (SD 1.x, 2.x, XL) or of a
model trained here.

  ldm-jax train --config configs/sd15_finetune.py --workdir runs/sd15_finetune \
      --config.pretrained=models/stable-diffusion-v1-5 --config.data.path=/data/my_photos

The recipe of diffusers' `examples/text_to_image/train_text_to_image.py` and
`train_text_to_image_sdxl.py`, on the shared loop (`ldm_jax/train/loop.py`: resume, EMA,
checkpoints, metrics):

- `config.pretrained` (a diffusers folder, an original single file, or a run trained here) is
  loaded with `ldm_jax.model.load` into the one `Model`. Only the U-Net is trained; the VAE and the text encoder(s)
  are frozen: they live in `state.frozen`, outside the optimizer and the gradients, and out of
  the checkpoints (a resume reads them from `config.pretrained` again and checks that they are
  the ones the run started with).
- The noise schedule and prediction type are the checkpoint's own: its `scheduler_config.json`
  read as diffusers' scripts read it (`DDPMScheduler.from_pretrained(..., subfolder="scheduler")`),
  so SD 1.5 trains on epsilon and SD 2.1-v on v; `config.prediction_type` overrides.
- Every step encodes its own images with the frozen VAE (a posterior sample times the
  checkpoint's scaling factor) and its captions with the frozen text encoder(s), inside the
  jitted update, as diffusers' SD 1.x script does, so a dataset of any size streams from disk and
  flips and caption dropout are drawn afresh every epoch. The VAE runs in float32 whatever
  `config.compute_dtype` is (diffusers: "The VAE is in float32 to avoid NaN losses").
- Or the VAE's work is done once (`ldm_jax.data.caption_batches`; `ldm-jax encode --config
  <this config>`, read through `data.precomputed_latents_dir`). At 512 px the VAE encoder costs
  1.08 TFLOP per image against 2.01 for the rest of the SD1.5 step, mostly the U-Net's forward
  and backward pass: in-step encoding has 1.54x the FLOPs (XLA's cost analysis, benchmarks/finetune_step.py;
  the time it adds depends on the hardware, see benchmarks/README.md). What is stored is the
  posterior (mean, std) of each image and, with `data.random_flip`, of its mirror image, so each
  step still draws its own posterior sample and flip: the loss is that of in-step encoding
  (tests/test_finetune.py). Captions stay text; the frozen text encoders still run in the step.
- Captions are replaced by the unconditional input with probability `p_uncond`, so the model
  keeps the unconditional score that classifier-free guidance needs (Ho & Salimans 2022): the
  encoded empty prompt (the scripts' `--proportion_empty_prompts`), or zero embeddings for
  checkpoints whose pipeline uses zeros as the unconditional input (SDXL base,
  `force_zeros_for_empty_prompt`; Stability's sgm `GeneralConditioner` zeroes the embeddings of
  dropped captions in training). `config.uncond` = "auto" picks what the checkpoint's pipeline
  does at inference.
- SDXL's added conditioning: the pooled text embedding and the time ids (original size, crop
  top-left, target size; Podell et al. 2023, Sec. 2.2) of every example, as
  `train_text_to_image_sdxl.py` computes them for center crops. A flip leaves the crop corner as
  it is: the mirror image of a centered crop is centered (to within the rounding of one pixel).
- `data.random_crop`: the images are stored resized and uncropped, and every step cuts a random
  `image_size` crop of each (torchvision's RandomCrop, the scripts' default without
  `--center_crop`), drawn from (seed, step, example) like everything else. SDXL's crop corner is
  then the crop's, and a flipped example gets the mirrored crop's corner (top, W - left - size).
- Options: Min-SNR-gamma loss weights (Hang et al. 2023; `loss_weighting="min_snr"`) and offset
  noise (Guttenberg 2023, "Diffusion with Offset Noise"; `noise_offset`, 0.1 in his post).

Where this differs from the diffusers scripts, on purpose: SDXL's dropped captions are zeros by
default (the script encodes "": `--config.uncond=empty_prompt` does that); a flipped example keeps
its center crop's corner, or gets the mirrored random crop's (the script sets x1 = width - x1,
which is neither);
Min-SNR for v-prediction weighs by min(SNR, gamma) / (SNR + 1), Hang et al.'s weight, where the
script uses min(SNR + 1, gamma) / (SNR + 1).

At the end, the EMA U-Net (with the frozen VAE, text encoders, tokenizers and the scheduler of the
checkpoint) is written as a diffusers folder to `<workdir>/export`:
`ldm-jax sample --pretrained <workdir>/export` and diffusers' `from_pretrained` load it.
`export_checkpoint(workdir)` does the same for the latest checkpoint of an unfinished run.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import images as image_lib
from ldm_jax import model as model_lib
from ldm_jax import rng as rng_lib
from ldm_jax.convert import configs as convert_configs
from ldm_jax.convert import save_pretrained
from ldm_jax.data import caption_batches
from ldm_jax.data.caption_batches import make_batches
from ldm_jax.data.tokenizers import token_ids
from ldm_jax.diffusion.objectives import PREDICTION_TYPES, denoising_loss
from ldm_jax.diffusion.schedules import NoiseSchedule
from ldm_jax.model import encode_prompt
from ldm_jax.pipeline import generate
from ldm_jax.runs import Checkpointer, averaged_params, open_run, params_fingerprint
from ldm_jax.train.objectives import Task

log = logging.getLogger("ldm_jax")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
UNCOND_MODES = ("auto", "empty_prompt", "zeros")
TRAINABLE_KINDS = ("sd1", "sd2", "sdxl", "run")


# --- The checkpoint -------------------------------------------------------------------------------


def load_model(config):
    """The checkpoint of `config.pretrained`; U-Net and text encoders in `config.compute_dtype`
    (the U-Net with `config.remat_policy`), the VAE in float32."""
    if not config.pretrained:
        raise ValueError(
            "config.pretrained is empty: give a diffusers folder or a single-file checkpoint, "
            "e.g. --config.pretrained=models/stable-diffusion-v1-5"
        )
    if config.compute_dtype not in DTYPES:
        raise ValueError(
            f"unknown compute_dtype {config.compute_dtype!r}; valid: {', '.join(DTYPES)}"
        )
    # A checkpoint, or a run trained here (its EMA weights): the same Model either way.
    model = model_lib.load(
        config.pretrained,
        variant=config.variant or None,
        tokenizer_dir=config.tokenizer_dir or None,
        tokenizer_2_dir=config.tokenizer_2_dir or None,
    )
    if model.kind not in TRAINABLE_KINDS:
        raise ValueError(
            f"{config.pretrained} is a {model.kind} checkpoint; fine-tuning supports "
            f"{', '.join(TRAINABLE_KINDS)} (the refiner's aesthetic-score and the inpainting "
            "U-Nets' mask inputs need data this trainer does not make)"
        )
    model.get_tokenizers()  # a single file without tokenizer_dir: say what to pass, now
    compute = {"dtype": DTYPES[config.compute_dtype]}
    if config.attention_implementation:
        compute["attention_implementation"] = config.attention_implementation
    return dataclasses.replace(
        model,
        unet=model.unet.clone(remat_policy=config.remat_policy, **compute),
        vae=model.vae.clone(dtype=jnp.float32),
        text_encoders=tuple(m.clone(**compute) for m in model.text_encoders),
    )


def training_schedule(model, prediction_type: str = "") -> tuple[NoiseSchedule, str]:
    """(schedule, prediction type) of the checkpoint, as diffusers' training scripts build them:
    `DDPMScheduler.from_pretrained(<checkpoint>, subfolder="scheduler")` reads the betas (and
    rescale_betas_zero_snr) of whatever scheduler class the checkpoint names; a field its file
    lacks takes DDPMScheduler's default. A checkpoint with no scheduler config (a single file
    without one) gets SD's (`Model.schedule`)."""
    config = model.scheduler_config or {}
    prediction_type = prediction_type or config.get("prediction_type") or "epsilon"
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}"
        )
    return model_lib.training_schedule(config), prediction_type


def uses_zero_uncond(model) -> bool:
    """Whether the checkpoint's pipeline feeds zeros as the unconditional embeddings."""
    return model.force_zeros_for_empty_prompt


def signature(model) -> dict:
    """What fixes the shapes of the train state: the architectures of all four components (of
    a run trained here: its config's model fields, its tokenizer having no transformers form)."""
    if model.kind == model_lib.RUN_KIND:
        from ldm_jax.train.objectives import ldm as ldm_stage

        return {"kind": model.kind, "run": ldm_stage.signature(model.config)}
    return {
        "kind": model.kind,
        "unet": convert_configs.unet_to_config(model.unet),
        "vae": convert_configs.vae_to_config(model.vae),
        "text_encoders": [convert_configs.clip_to_config(m) for m in model.text_encoders],
    }


def frozen_params(model) -> dict:
    """The frozen part of the train state: {"vae": ..., "text_encoders": {slot: ...}}."""
    return model.frozen_params()


def with_params(model, unet_params, frozen: dict):
    """`model` holding the given U-Net parameters and frozen parameters."""
    return dataclasses.replace(
        model,
        unet_params=unet_params,
        vae_params=frozen["vae"],
        text_encoder_params=tuple(frozen["text_encoders"][s] for s in model.text_encoder_slots),
    )


def encode_dataset(config, out_dir, **kwargs) -> dict:
    """`ldm-jax encode` with a finetune config: `caption_batches.encode_dataset` with the VAE of
    `config.pretrained` (loaded as for training)."""
    return caption_batches.encode_dataset(config, load_model, out_dir, **kwargs)


# --- The objective -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a training step computes; fixed for a run. `model` holds the modules (its parameters
    are not read here: the U-Net's come from the train state, the frozen ones from state.frozen)."""

    model: Any
    schedule: NoiseSchedule
    prediction_type: str
    p_uncond: float
    uncond: str  # "empty_prompt" or "zeros"
    empty_ids: tuple  # int32[L] per tokenizer: the empty prompt
    image_size: int
    random_flip: bool
    loss_weighting: str = "none"
    min_snr_gamma: float = 5.0
    noise_offset: float = 0.0

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.image_size // self.model.vae_scale_factor
        return side, side, self.model.vae.latent_channels


def make_objective(config, model) -> Objective:
    schedule, prediction_type = training_schedule(model, config.prediction_type)
    if config.uncond not in UNCOND_MODES:
        raise ValueError(f"unknown uncond {config.uncond!r}; valid: {', '.join(UNCOND_MODES)}")
    uncond = config.uncond
    if uncond == "auto":
        uncond = "zeros" if uses_zero_uncond(model) else "empty_prompt"
    multiple = model.vae_scale_factor * 2 ** (len(model.unet.block_out_channels) - 1)
    if config.data.image_size % multiple:
        raise ValueError(
            f"data.image_size must be a multiple of {multiple}, got {config.data.image_size}"
        )
    log.info(
        "fine-tuning a %s U-Net: prediction_type %s, unconditional input %s (p=%g)",
        model.kind,
        prediction_type,
        uncond,
        config.p_uncond,
    )
    return Objective(
        model=dataclasses.replace(model, unet_params=None, vae_params=None, text_encoder_params=()),
        schedule=schedule,
        prediction_type=prediction_type,
        p_uncond=float(config.p_uncond),
        uncond=uncond,
        empty_ids=tuple(token_ids(t, [""])[0] for t in model.get_tokenizers()),
        image_size=int(config.data.image_size),
        random_flip=bool(config.data.random_flip),
        loss_weighting=config.loss_weighting,
        min_snr_gamma=float(config.min_snr_gamma),
        noise_offset=float(config.noise_offset),
    )


def sample_draws(objective: Objective, rng: jax.Array, batch_size: int) -> dict:
    """The randomness of one step: posterior and diffusion noise f32[B, h, w, c], offset noise
    f32[B, 1, 1, c], timesteps int32[B], caption dropout and flips bool[B], a dropout key."""
    shape = (batch_size, *objective.latent_shape)
    k = jax.random.split(rng, 7)
    return {
        "posterior": rng_lib.normal(k[0], shape),
        "noise": rng_lib.normal(k[1], shape),
        "offset": rng_lib.normal(k[2], (batch_size, 1, 1, shape[-1])),
        "t": jax.random.randint(k[3], (batch_size,), 0, objective.schedule.num_train_timesteps),
        "drop": jax.random.bernoulli(k[4], objective.p_uncond, (batch_size,)),
        "flip": jax.random.bernoulli(k[5], 0.5, (batch_size,)) & objective.random_flip,
        "dropout": k[6],
    }


def encode_captions(objective: Objective, frozen, input_ids, drop):
    """(encoder_hidden_states f32[B, L, D], pooled f32[B, P] or None) with dropped captions
    replaced by the unconditional input."""
    model = objective.model
    if objective.uncond == "empty_prompt":
        input_ids = tuple(
            jnp.where(drop[:, None], jnp.asarray(empty)[None], ids)
            for empty, ids in zip(objective.empty_ids, input_ids, strict=True)
        )
    params = tuple(frozen["text_encoders"][s] for s in model.text_encoder_slots)
    context, pooled = encode_prompt(model, params, input_ids)
    if objective.uncond == "zeros":
        keep = 1.0 - drop.astype(jnp.float32)
        context = context * keep[:, None, None]
        pooled = None if pooled is None else pooled * keep[:, None]
    return context, pooled


def sdxl_time_ids(objective: Objective, batch, flip) -> jax.Array:
    """SDXL's micro-conditioning f32[B, 6]: diffusers' `compute_time_ids` (original size, crop
    top-left, target size = the crop size); a flipped random crop has its own corner."""
    target_size = jnp.full_like(batch["original_size"], objective.image_size)
    crop = batch["crop_top_left"]
    if "crop_top_left_flipped" in batch:
        crop = jnp.where(flip[:, None], batch["crop_top_left_flipped"], crop)
    time_ids = jnp.concatenate([batch["original_size"], crop, target_size], axis=-1)
    return time_ids.astype(jnp.float32)


def loss_with_draws(objective: Objective, params, frozen, batch, draws):
    """The weighted MSE of the U-Net's output to its target (eps / v / x0) -> (loss, aux)."""
    model = objective.model
    flip = draws["flip"][:, None, None, None]
    if "latent_mean" in batch:  # precomputed (encode_dataset): the same posterior, read
        mean, std = batch["latent_mean"], batch["latent_std"]
        if "latent_mean_flipped" in batch:
            mean = jnp.where(flip, batch["latent_mean_flipped"], mean)
            std = jnp.where(flip, batch["latent_std_flipped"], std)
    else:
        x = batch["image"].astype(jnp.float32) / 127.5 - 1.0
        posterior = model.vae.apply(
            frozen["vae"], jnp.where(flip, x[:, :, ::-1], x), method=model.vae.encode
        )
        mean, std = posterior.mean, posterior.std
    latents = (mean + std * draws["posterior"]) * model.scaling_factor
    latents = jax.lax.stop_gradient(latents)
    # Not stopped: the encoders are frozen, so no gradient reaches them unless a trainable group
    # feeds them (the LoRA objective's text-encoder adapter, folded into `frozen`).
    context, pooled = encode_captions(objective, frozen, batch["input_ids"], draws["drop"])
    added = None
    if pooled is not None:
        added = {"text_embeds": pooled, "time_ids": sdxl_time_ids(objective, batch, draws["flip"])}
    noise = draws["noise"] + objective.noise_offset * draws["offset"]
    apply = lambda x_t, t: model.unet.apply(
        params, x_t, t, context, train=True, added_cond_kwargs=added,
        rngs={"dropout": draws["dropout"]},
    )  # fmt: skip
    return denoising_loss(
        apply, latents, noise, draws["t"], objective.schedule.alphas_cumprod,
        objective.prediction_type, objective.loss_weighting, objective.min_snr_gamma,
    )  # fmt: skip


def make_loss_fn(objective: Objective):
    """loss_fn(params, frozen, batch, rng) -> (loss, aux), the signature loop.run takes."""

    def loss_fn(params, frozen, batch, rng):
        draws = sample_draws(objective, rng, batch["input_ids"][0].shape[0])
        return loss_with_draws(objective, params["unet"], frozen, batch, draws)

    return loss_fn


# --- Samples and export --------------------------------------------------------------------------


def make_on_sample(config, model, workdir: pathlib.Path, unet_params=None, frozen=None):
    """on_sample(step, state): a grid of the sample prompts, one per column, with the U-Net
    `unet_params(state)` gives (default: the EMA U-Net) and the VAE and text encoders of
    `frozen(state)` (default: `state.frozen`)."""
    prompts = list(config.sample.prompts)
    unet_params = unet_params or (lambda state: state.averaged()["unet"])
    frozen = frozen or (lambda state: state.frozen)

    def on_sample(step, state):
        if not prompts:
            return None
        images = generate(
            with_params(model, unet_params(state), frozen(state)),
            prompts,
            num_inference_steps=config.sample.num_inference_steps,
            guidance_scale=config.sample.guidance_scale,
            height=config.data.image_size,
            width=config.data.image_size,
            seed=config.sample.seed,
            sampler=config.sample.sampler or None,
            batch_size=len(prompts),
        )
        if jax.process_index() != 0:
            return None
        grid = image_lib.make_grid(images, ncols=len(prompts))
        return image_lib.save_png(grid, workdir / "samples" / f"step_{step:06d}.png")

    return on_sample


def export(model, unet_params, frozen, out: str | pathlib.Path) -> pathlib.Path:
    """Write `model` with these parameters as a diffusers folder (float32 safetensors), replacing
    `out` only once the new folder is complete. Process 0 writes; the others return at once."""
    out = pathlib.Path(out)
    if jax.process_index() != 0:
        return out
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    host = jax.device_get((unet_params, frozen))
    save_pretrained(with_params(model, *host), tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def export_checkpoint(
    workdir: str | pathlib.Path, out: str | pathlib.Path | None = None, *, ema: bool = True
) -> pathlib.Path:
    """The latest checkpoint of a fine-tuning run as a diffusers folder (default
    `<workdir>/export`); its EMA U-Net unless ema=False."""
    workdir = pathlib.Path(workdir)
    config, state, step = open_run(workdir, ("finetune",), what="export")
    checkpointer = Checkpointer(workdir, read_only=True)
    model = load_model(config)
    frozen = state.get("frozen")
    if not frozen:  # left out of the checkpoint: the pretrained checkpoint's, if unchanged
        frozen = frozen_params(model)
        saved = checkpointer.read_meta(step).get("frozen_fingerprint")
        if saved != params_fingerprint(frozen):
            raise ValueError(
                f"{config.pretrained} no longer holds the VAE and text encoder(s) that {workdir} "
                f"was trained with (fingerprint {saved}); point --config.pretrained at those"
            )
    unet_params = (averaged_params(state) if ema else state["params"])["unet"]
    path = export(model, unet_params, frozen, out or workdir / "export")
    log.info("exported step %d of %s to %s", step, workdir, path)
    return path


# --- Training ------------------------------------------------------------------------------------


def build(config, workdir: str | pathlib.Path) -> Task:
    """The trainable group "unet"; frozen: the VAE and text encoder(s), left out of checkpoints
    (a resume reads them from config.pretrained again, checked by fingerprint). At the end the
    EMA U-Net of a checkpoint's fine-tuning is exported as a diffusers folder."""
    workdir = pathlib.Path(workdir)
    model = load_model(config)
    objective = make_objective(config, model)

    # --- Data: images and token ids by (seed, step); decoded, encoded and noised in the step. ---
    batches = make_batches(config, model)

    # --- Model: the U-Net trains, the VAE and text encoders ride in `frozen`. ---
    pretrained = jax.tree.map(np.asarray, (model.unet_params, frozen_params(model)))
    # Checkpoints leave the frozen weights out (6% of an SD1.5 checkpoint, 8% of an SDXL one:
    # VAE and text encoders next to the U-Net's parameters, EMA and two AdamW moments); a resume
    # reads them from config.pretrained again, which must be unchanged (its fingerprint).
    frozen_fingerprint = params_fingerprint(pretrained[1])

    def init_fn(unet_params, frozen):
        return {"unet": unet_params}, frozen

    def finish(state):
        # --- Export: a diffusers folder with the fine-tuned (EMA) U-Net. ---
        if model.kind == model_lib.RUN_KIND:  # no diffusers layout for its tokenizer and configs
            log.info("sample the fine-tuned model with `ldm-jax sample --workdir %s`", workdir)
            return
        unet_params = (state.averaged() if config.export_ema else state.params)["unet"]
        path = export(model, unet_params, state.frozen, workdir / "export")
        log.info(
            "exported the %s U-Net of step %d to %s (ldm-jax sample --pretrained %s)",
            "EMA" if config.export_ema else "trained",
            int(state.step),
            path,
            path,
        )

    return Task(
        groups=("unet",),
        init_fn=init_fn,
        init_args=pretrained,
        phases=make_loss_fn(objective),
        batches=batches,
        signature=signature(model),
        on_sample=make_on_sample(config, model, workdir),
        frozen_fingerprint=frozen_fingerprint,
        finish=finish,
    )
