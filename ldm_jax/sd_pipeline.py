"""Text-to-image, img2img and inpainting over pretrained Stable Diffusion weights (SD 1.x, 2.x, XL).

  sd = StableDiffusion.from_pretrained("models/stable-diffusion-v1-5")
  images = generate(sd, "a photo of an astronaut", num_inference_steps=25, seed=0)  # uint8[1,H,W,3]

Arguments and their meaning follow diffusers' `StableDiffusionPipeline`,
`StableDiffusionXLPipeline`, `...Img2ImgPipeline` and `...InpaintPipeline` (diffusers 0.42), so
that the same prompt, initial latents and deterministic sampler give the same image (checked in
tests/test_sd_pipeline.py against tiny random diffusers pipelines).

Text encoding, the whole denoising loop and the VAE run in one jitted function per (sampler,
steps, sampler options, image size, mode, batch size); prompts, seeds, guidance scales, SDXL
micro-conditioning and init images are traced arguments and do not recompile. Conditional and
unconditional passes share one U-Net batch, and each batch is split over the mesh's data axis.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import pathlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import rng as rng_lib
from ldm_jax import sharding as sharding_lib
from ldm_jax.diffusion import samplers as sampler_lib
from ldm_jax.diffusion.guidance import classifier_free_guidance
from ldm_jax.diffusion.schedules import (
    SCHEDULER_CLASSES,
    NoiseSchedule,
    sampler_from_scheduler_config,
)

log = logging.getLogger("ldm_jax")

# The scheduler of checkpoints without a scheduler_config.json (original single files): SD's
# training betas (Rombach et al. 2022, "linear_start/linear_end" of the original configs) and
# diffusers' SD step spacing; a config's own fields override these.
SD_SCHEDULER_DEFAULTS = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "clip_sample": False,
}
# Options that every sampler takes; the ones passed to samplers not in SCHEDULER_CLASSES.
COMMON_OPTIONS = ("prediction_type", "timestep_spacing", "steps_offset")

# Sampler options that img2img needs; see `check_img2img_support`.
IMG2IMG_OPTIONS = ("start_step", "init_latents")


@dataclasses.dataclass
class StableDiffusion:
    """A loaded checkpoint (`ldm_jax.convert.PretrainedModel`) and the mesh to run it on.

    force_zeros_for_empty_prompt: SDXL's pipeline flag (model_index.json): without a negative
    prompt the unconditional embeddings are zeros instead of the encoded empty prompt.
    """

    model: Any
    mesh: Any
    force_zeros_for_empty_prompt: bool = False
    _compiled: dict = dataclasses.field(default_factory=dict, repr=False)
    _evaluations: dict = dataclasses.field(default_factory=dict, repr=False)  # for the bar
    _progress: list = dataclasses.field(default_factory=lambda: [None], repr=False)

    @classmethod
    def from_model(cls, model, mesh=None, force_zeros_for_empty_prompt=None) -> StableDiffusion:
        if force_zeros_for_empty_prompt is None:
            index = getattr(model, "configs", {}).get("model_index", {})
            force_zeros_for_empty_prompt = index.get("force_zeros_for_empty_prompt")
        if force_zeros_for_empty_prompt is None:
            # diffusers' defaults: True for SDXL base pipelines, False for the refiner (img2img).
            force_zeros_for_empty_prompt = model.kind.startswith("sdxl") and "refiner" not in (
                model.kind
            )
        return cls(
            model=model,
            mesh=mesh if mesh is not None else sharding_lib.make_mesh({"data": -1}),
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | pathlib.Path,
        *,
        variant: str | None = None,
        tokenizer_dir: str | pathlib.Path | None = None,
        tokenizer_2_dir: str | pathlib.Path | None = None,
        mesh=None,
        **overrides,
    ) -> StableDiffusion:
        """A diffusers folder or single-file checkpoint (see `ldm_jax.convert.load_pretrained`);
        overrides: module fields for every model, e.g. dtype=jnp.bfloat16 (compute dtype)."""
        from ldm_jax.convert import load_pretrained

        model = load_pretrained(
            path,
            variant=variant,
            tokenizer_dir=tokenizer_dir,
            tokenizer_2_dir=tokenizer_2_dir,
            **overrides,
        )
        return cls.from_model(model, mesh=mesh)

    @property
    def is_sdxl(self) -> bool:
        return self.model.kind.startswith("sdxl")

    @property
    def requires_aesthetics_score(self) -> bool:
        return "refiner" in self.model.kind

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.model.vae.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        """diffusers: unet.config.sample_size * vae_scale_factor; the released checkpoints'."""
        size = getattr(self.model, "configs", {}).get("unet", {}).get("sample_size")
        if size:
            return int(size) * self.vae_scale_factor
        if self.is_sdxl:
            return 1024
        v = self.model.scheduler_config.get("prediction_type") == "v_prediction"
        return 768 if self.model.kind.startswith("sd2") and v else 512


# --- Inputs: tokens, images, masks, noise --------------------------------------------------------


def tokenize(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """int32[N, model_max_length]: padded to the context length and truncated, as diffusers'
    `encode_prompt` (each tokenizer's own pad token: "<|endoftext|>" or "!" for OpenCLIP)."""
    limit = tokenizer.model_max_length
    for text, full in zip(texts, tokenizer(list(texts)).input_ids):
        if len(full) > limit:
            log.warning("prompt truncated to %d tokens: %r", limit, text)
    ids = tokenizer(
        list(texts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="np",
    ).input_ids
    return np.asarray(ids, np.int32)


def _as_list(value, name: str) -> list:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} must be a string or a list of strings, got {type(value)}")
    return list(value)


def load_image(image, height: int, width: int, grayscale: bool = False) -> np.ndarray:
    """A PIL image, a path, or an array (uint8 [H,W,C] or float [H,W,C] in [0, 1]) ->
    float32[height, width, C] in [0, 1], resized with Lanczos as diffusers' VaeImageProcessor."""
    from PIL import Image

    if isinstance(image, str | pathlib.Path):
        try:
            with Image.open(image) as opened:
                opened.load()  # a truncated or corrupt file raises here, with its name below
                image = opened.copy()
        except (OSError, SyntaxError) as e:  # PIL's errors for unreadable files
            raise ValueError(f"cannot read image {image}: {e}") from e
    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3:
            raise ValueError(f"an image must be [H, W] or [H, W, C], got shape {array.shape}")
        if array.dtype != np.uint8:
            if array.min() < 0 or array.max() > 1:
                raise ValueError("float images must lie in [0, 1]")
            array = np.round(array * 255).astype(np.uint8)
        image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    image = image.convert("L" if grayscale else "RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    out = np.asarray(image, np.float32) / 255.0
    return out[..., None] if grayscale else out


def images_per_prompt(
    images, num_prompts: int, height: int, width: int, grayscale=False, per: str = "prompt"
):
    """One image for all prompts or one per prompt -> float32[num_prompts, H, W, C] in [0, 1];
    `per` names what the count is of, in the error for a wrong count ("prompt", "image")."""
    if isinstance(images, list | tuple):
        loaded = [load_image(im, height, width, grayscale) for im in images]
    elif isinstance(images, np.ndarray | jax.Array) and np.ndim(images) == 4:
        loaded = [load_image(im, height, width, grayscale) for im in np.asarray(images)]
    else:
        loaded = [load_image(images, height, width, grayscale)]
    if len(loaded) == 1:
        loaded = loaded * num_prompts
    if len(loaded) != num_prompts:
        raise ValueError(f"give one image or one per {per} ({num_prompts}), got {len(loaded)}")
    return np.stack(loaded)


@jax.jit
def _noise_from_seeds(seeds: jax.Array, template: jax.Array) -> jax.Array:
    shape = template.shape
    return jax.vmap(lambda s: rng_lib.normal(jax.random.key(s), shape))(seeds)


def initial_noise(seeds: Sequence[int], latent_shape: tuple[int, int, int]) -> np.ndarray:
    """float32[N, h, w, c] standard-normal initial latents, image i from seed i alone (so an
    image does not depend on its batch-mates)."""
    seeds = jnp.asarray(np.asarray(seeds, np.uint32))
    return np.asarray(_noise_from_seeds(seeds, jnp.zeros(latent_shape)))


# --- The jitted function -------------------------------------------------------------------------


def _final_layer_norm(encoder, params, h):
    """CLIP's final LayerNorm on an intermediate hidden state (diffusers' clip_skip for SD1/2)."""
    ln_params = params["params"] if "params" in params else params
    return nn.LayerNorm(epsilon=encoder.layer_norm_eps).apply(
        {"params": ln_params["final_layer_norm"]}, h
    )


def encode_prompt(model, params, ids, clip_skip=None, *, negative: bool = False):
    """Token ids per encoder -> (encoder_hidden_states f32[B,L,D], pooled f32[B,P] or None), as
    diffusers' `encode_prompt`. SD1/2: the last hidden state (SD2's checkpoints already drop the
    last OpenCLIP layer), or with clip_skip the final-LN'd hidden state clip_skip layers earlier.
    SDXL: every encoder's penultimate hidden state (clip_skip more layers back) concatenated on
    the feature axis, and the projected pooled output of the encoder that has a projection.
    diffusers ignores clip_skip for negative prompts; so do we, to give the same images."""
    skip = None if negative else clip_skip
    if not model.kind.startswith("sdxl"):
        encoder, p = model.text_encoders[0], params[0]
        out = encoder.apply(p, ids[0], output_hidden_states=skip is not None)
        if skip is None:
            return out.last_hidden_state, None
        return _final_layer_norm(encoder, p, out.hidden_states[-(skip + 1)]), None
    states, pooled = [], None
    for encoder, p, x in zip(model.text_encoders, params, ids):
        out = encoder.apply(p, x, output_hidden_states=True)
        states.append(out.hidden_states[-(2 + (skip or 0))])
        if pooled is None and out.text_embeds is not None:
            pooled = out.text_embeds
    return jnp.concatenate(states, axis=-1), pooled


def _build_fn(
    sd: StableDiffusion, sampler: str, num_steps: int, options: tuple, mode: str, schedule
):
    """jit(params, batch) -> uint8[B, H, W, 3]; see `generate` for the batch fields."""
    model = sd.model
    sample = sampler_lib.get_sampler(sampler)
    options = dict(options)
    clip_skip = options.pop("clip_skip", None)
    rescale_on = options.pop("guidance_rescale_on", False)
    # The host callback only when a bar is shown: executables with host callbacks are not
    # written to the persistent compilation cache.
    ticks = options.pop("progress", False)
    scale = model.scaling_factor
    progress = sd._progress  # read by the host callback, so a new bar does not retrace

    def tick():
        if progress[0] is not None:
            progress[0].update(1)

    def fn(params, batch):
        cond, pooled = encode_prompt(model, params["text"], batch["ids"], clip_skip, negative=False)
        uncond, neg_pooled = encode_prompt(
            model, params["text"], batch["neg_ids"], clip_skip, negative=True
        )
        keep = (1.0 - batch["neg_zero"])[:, None, None]  # SDXL force_zeros_for_empty_prompt
        uncond = uncond * keep
        added = None
        if pooled is not None:
            added = {
                "text_embeds": jnp.concatenate([neg_pooled * keep[:, 0], pooled]),
                "time_ids": jnp.concatenate([batch["neg_time_ids"], batch["time_ids"]]),
            }

        def vae_latents(images, salt):
            """images in [-1, 1] -> diffusers' retrieve_latents(sample_mode="sample") *
            scaling_factor, the posterior noise from each image's seed."""
            posterior = model.vae.apply(params["vae"], images, method=model.vae.encode)
            keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), salt))(batch["seed"])
            eps = jax.vmap(lambda k, m: rng_lib.normal(k, m.shape))(keys, posterior.mean)
            return (posterior.mean + posterior.std * eps) * scale

        extra = None
        if mode == "inpaint":
            # The 9-channel U-Net sees [latents, mask, masked-image latents] (diffusers'
            # StableDiffusionInpaintPipeline); the mask is resized with "nearest" (top-left
            # pixel of each f x f block, torch's F.interpolate default).
            f = sd.vae_scale_factor
            mask = batch["mask"]
            masked = (batch["image"] * 2 - 1) * (mask < 0.5)  # masked pixels -> 0 (gray)
            extra = jnp.concatenate([mask[:, ::f, ::f], vae_latents(masked, 2)], axis=-1)
            extra = jnp.concatenate([extra, extra])

        def apply(x, t, context):
            if ticks:
                jax.debug.callback(tick)  # one tick per network evaluation
            if extra is not None:
                x = jnp.concatenate([x, extra], axis=-1)
            return model.unet.apply(params["unet"], x, t, context, added_cond_kwargs=added)

        model_fn = classifier_free_guidance(
            apply,
            cond,
            uncond,
            batch["guidance"],
            guidance_rescale=batch["rescale"] if rescale_on else 0.0,
        )
        kwargs = dict(options)
        if "start_step" in options:  # img2img, or inpainting with strength < 1
            kwargs["init_latents"] = vae_latents(batch["image"] * 2 - 1, 1)
        rng = jax.random.fold_in(jax.random.key(batch["seed"][0]), 3)
        latents = sample(model_fn, batch["noise"], schedule, num_steps, rng, **kwargs)
        images = model.vae.apply(params["vae"], latents / scale, method=model.vae.decode)
        # diffusers' postprocess: (x / 2 + 0.5).clamp(0, 1), then (x * 255).round() to uint8.
        return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    repl = sharding_lib.replicated(sd.mesh)
    data = sharding_lib.batch_sharding(sd.mesh)
    return jax.jit(fn, in_shardings=(repl, data), out_shardings=data)


def _count_evaluations(sampler: str, num_steps: int, options: tuple, schedule) -> int:
    """Network evaluations of one run, counted by running the sampler on a 1-element latent
    with a stand-in network (the loop is compiled, so tracing alone cannot count them)."""
    calls = []
    options = dict(options)
    if "start_step" in options:
        options["init_latents"] = jnp.zeros((1, 1, 1, 1))

    def model_fn(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return 0.1 * x

    noise = jnp.ones((1, 1, 1, 1))
    run = jax.jit(
        lambda n: sampler_lib.get_sampler(sampler)(
            model_fn, n, schedule, num_steps, jax.random.key(0), **options
        )
    )
    jax.block_until_ready(run(noise))
    jax.effects_barrier()
    return len(calls)


def _keyword_options(name: str) -> set[str] | None:
    """The keyword options a sampler takes, or None when it forwards **options (aliases)."""
    params = inspect.signature(sampler_lib.get_sampler(name)).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def resolve_sampler(
    scheduler_config: dict, sampler: str | None = None, user_options: dict | None = None
) -> tuple[str, dict, NoiseSchedule]:
    """(sampler name, options, schedule) for a checkpoint's scheduler_config.json.

    sampler=None: the checkpoint's own scheduler (`sampler_from_scheduler_config`). A named
    sampler reads the same config as diffusers' `NewScheduler.from_config(pipe.scheduler.config)`
    does. Config fields the chosen sampler does not implement are dropped with a warning (the
    images then differ slightly from diffusers'); `user_options` it does not take are an error.
    """
    # A field the file lacks takes the default of the class that reads it (diffusers'
    # `_use_default_values`): SD 1.5's PNDM config has no timestep_spacing, so with Euler it is
    # Euler's "linspace", not PNDM's "leading". Only a checkpoint with no config at all gets SD's.
    config = dict(scheduler_config) if scheduler_config else dict(SD_SCHEDULER_DEFAULTS)
    if sampler is not None:
        sampler_lib.get_sampler(sampler)  # unknown names: the registry's error lists them
        classes = {v[0]: k for k, v in SCHEDULER_CLASSES.items()}
        classes.update(pndm="PNDMScheduler", plms="PNDMScheduler")
        if sampler in classes:
            config = {**config, "_class_name": classes[sampler]}
            config["skip_prk_steps"] = sampler == "plms"
        else:  # e.g. the dpmpp_2m alias: only the options that mean the same to every sampler
            common = {k: config[k] for k in COMMON_OPTIONS if k in config}
            _, _, schedule = sampler_from_scheduler_config(config)
            return sampler, _merge_user_options(sampler, common, user_options), schedule
    name, options, schedule = sampler_from_scheduler_config(config)
    accepted = _keyword_options(name)
    if accepted is not None:
        dropped = {k: v for k, v in options.items() if k not in accepted}
        if dropped:
            log.warning(
                "sampler %r does not implement scheduler_config %s; ignoring them (images may "
                "differ slightly from diffusers')",
                name,
                ", ".join(f"{k}={v!r}" for k, v in dropped.items()),
            )
        options = {k: v for k, v in options.items() if k in accepted}
    return name, _merge_user_options(name, options, user_options), schedule


def check_sampler_options(name: str, user_options: dict | None) -> None:
    """ValueError naming the options sampler `name` does not take (and those it does)."""
    sampler_lib.get_sampler(name)  # unknown names: the registry's error lists them
    accepted = _keyword_options(name)
    unknown = set(user_options or {}) - accepted if accepted is not None else set()
    if unknown:
        raise ValueError(
            f"sampler {name!r} has no option(s) {sorted(unknown)}; valid: {sorted(accepted)}"
        )


def _merge_user_options(name: str, options: dict, user_options: dict | None) -> dict:
    user_options = dict(user_options or {})
    check_sampler_options(name, user_options)
    merged = {**options, **user_options}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()}


def supports_img2img(sampler: str) -> bool:
    """Whether `sampler` takes IMG2IMG_OPTIONS (aliases forwarding **options: assumed yes)."""
    accepted = _keyword_options(sampler)
    return accepted is None or all(o in accepted for o in IMG2IMG_OPTIONS)


def img2img_start_step(num_inference_steps: int, strength: float) -> int:
    """The steps img2img skips: diffusers' `get_timesteps` keeps the last
    int(num_inference_steps * strength) of them."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    start_step = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
    if start_step >= num_inference_steps:
        raise ValueError(f"strength {strength} leaves no steps of {num_inference_steps}")
    return start_step


def check_img2img_support(sampler: str):
    if not supports_img2img(sampler):
        missing = [o for o in IMG2IMG_OPTIONS if o not in _keyword_options(sampler)]
        raise ValueError(
            f"img2img needs a sampler that starts from noised init latents part-way (options "
            f"{missing}); sampler {sampler!r} has no such option yet"
        )


# --- generate ------------------------------------------------------------------------------------


def generate(
    sd: StableDiffusion,
    prompt: str | Sequence[str],
    *,
    negative_prompt: str | Sequence[str] | None = None,
    prompt_2: str | Sequence[str] | None = None,
    negative_prompt_2: str | Sequence[str] | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    guidance_rescale: float = 0.0,
    height: int | None = None,
    width: int | None = None,
    num_images_per_prompt: int = 1,
    seed: int | Sequence[int] = 0,
    latents: np.ndarray | None = None,
    sampler: str | None = None,
    sampler_options: dict | None = None,
    clip_skip: int | None = None,
    image=None,
    mask_image=None,
    strength: float | None = None,
    original_size: tuple[int, int] | None = None,
    crops_coords_top_left: tuple[int, int] = (0, 0),
    target_size: tuple[int, int] | None = None,
    aesthetic_score: float = 6.0,
    negative_aesthetic_score: float = 2.5,
    batch_size: int = 8,
    progress: bool = False,
) -> np.ndarray:
    """Images for prompts -> uint8[len(prompts) * num_images_per_prompt, height, width, 3],
    prompt-major (diffusers' order: p0, p0, p1, p1 for two images per prompt).

    prompt_2 / negative_prompt_2: SDXL's prompts for the second text encoder (default: the
    first ones), as diffusers' StableDiffusionXLPipeline.

    seed: an int (image i uses seed + i) or one seed per image; `latents` (f32[N, h, w, c], NHWC,
    standard normal, diffusers' `latents` transposed) replace the seeded noise. guidance_scale <= 1
    is the conditional model alone (diffusers'). `image` alone is
    img2img (`strength`, default 0.8: diffusers' truncation, the first
    num_inference_steps - int(num_inference_steps * strength) steps are skipped); with `mask_image`
    (white = repaint) it is inpainting (default strength 1.0) and needs a 9-channel inpainting
    U-Net. SDXL: original_size / crops_coords_top_left / target_size micro-conditioning (default
    (height, width), (0, 0), (height, width)); the refiner uses aesthetic scores instead of
    target_size. batch_size: images per compiled batch, rounded up to a multiple of the devices.
    """
    model = sd.model
    if len(model.tokenizers) != len(model.text_encoders):
        raise ValueError(
            f"{model.source or 'this checkpoint'} has {len(model.text_encoders)} text encoder(s) "
            f"but {len(model.tokenizers)} tokenizer(s): give the tokenizer folder(s) "
            "(tokenizer_dir / tokenizer_2_dir; `--tokenizer` / `--tokenizer-2` on the command line)"
        )
    prompts = _as_list(prompt, "prompt")

    def per_prompt(texts, name, default):
        texts = default if texts is None else _as_list(texts, name)
        texts = texts * len(prompts) if len(texts) == 1 else texts
        if len(texts) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(texts)} {name.replace('_', ' ')}s")
        return texts

    negatives = per_prompt(negative_prompt, "negative_prompt", [""])
    # Per text encoder: SDXL's second encoder reads prompt_2 / negative_prompt_2 if given.
    texts = [(prompts, negatives)] + [
        (
            per_prompt(prompt_2, "prompt_2", prompts),
            per_prompt(negative_prompt_2, "negative_prompt_2", negatives),
        )
    ] * (len(model.tokenizers) - 1)
    if not sd.is_sdxl and (prompt_2 is not None or negative_prompt_2 is not None):
        raise ValueError("prompt_2 / negative_prompt_2 are for SDXL's second text encoder")
    if num_inference_steps < 1 or num_images_per_prompt < 1:
        raise ValueError(
            "num_inference_steps and num_images_per_prompt must be >= 1, got "
            f"{num_inference_steps}, {num_images_per_prompt}"
        )
    for name, value in (("guidance_scale", guidance_scale), ("guidance_rescale", guidance_rescale)):
        if not np.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if clip_skip is not None and clip_skip < 0:
        raise ValueError(f"clip_skip must be >= 0, got {clip_skip}")
    height = height or sd.default_size
    width = width or sd.default_size
    f = sd.vae_scale_factor * 2 ** (len(model.unet.block_out_channels) - 1)
    if height % f or width % f:
        raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
    inpaint_unet = model.unet.in_channels != model.vae.latent_channels
    if mask_image is not None:
        if image is None:
            raise ValueError("mask_image needs image (the picture to inpaint)")
        if not inpaint_unet:
            raise ValueError(
                f"inpainting needs a 9-channel inpainting U-Net; this {model.kind} checkpoint's "
                f"U-Net takes {model.unet.in_channels} channels"
            )
        mode = "inpaint"
    else:
        if inpaint_unet:
            raise ValueError(f"the {model.kind} checkpoint is an inpainting model: give mask_image")
        mode = "img2img" if image is not None else "txt2img"
    if strength is None:
        strength = 0.8 if mode == "img2img" else 1.0
    if mode == "txt2img" and strength != 1:
        raise ValueError("strength needs an init image")
    start_step = img2img_start_step(num_inference_steps, strength)

    # Per-image host arrays (N = prompts x images per prompt, prompt-major).
    per = num_images_per_prompt
    n = len(prompts) * per
    rep = lambda a: np.repeat(np.asarray(a), per, axis=0)
    seeds = (
        np.arange(n, dtype=np.int64) + seed
        if isinstance(seed, int | np.integer)
        else np.asarray(list(seed), np.int64)
    )
    if seeds.shape != (n,):
        raise ValueError(f"give one seed or one per image ({n}), got {len(seeds)}")
    seeds = rng_lib.seed_array(seeds)
    latent_shape = (height // sd.vae_scale_factor, width // sd.vae_scale_factor)
    latent_shape += (model.vae.latent_channels,)
    if latents is None:
        noise = initial_noise(seeds, latent_shape)
    else:
        noise = np.asarray(latents, np.float32)
        if noise.shape != (n, *latent_shape):
            raise ValueError(
                f"latents must be [N, h, w, c] = {(n, *latent_shape)}, got {noise.shape}"
            )
    batch = {
        "ids": tuple(rep(tokenize(t, p)) for t, (p, _) in zip(model.tokenizers, texts)),
        "neg_ids": tuple(rep(tokenize(t, n)) for t, (_, n) in zip(model.tokenizers, texts)),
        "neg_zero": np.full(n, negative_prompt is None and sd.force_zeros_for_empty_prompt, "f4"),
        # diffusers guides only when guidance_scale > 1 and otherwise runs the conditional model,
        # which is guidance 1 here.
        "guidance": np.full(n, max(guidance_scale, 1.0), np.float32),
        "rescale": np.full(n, guidance_rescale, np.float32),
        "noise": noise,
        "seed": seeds,
    }
    if sd.is_sdxl:
        original_size = tuple(original_size or (height, width))
        target_size = tuple(target_size or (height, width))
        crops = tuple(crops_coords_top_left)
        if sd.requires_aesthetics_score:  # diffusers' SDXL img2img `_get_add_time_ids`
            ids = original_size + crops + (aesthetic_score,)
            neg = original_size + crops + (negative_aesthetic_score,)
        else:
            ids = neg = original_size + crops + target_size
        batch["time_ids"] = np.tile(np.asarray(ids, np.float32), (n, 1))
        batch["neg_time_ids"] = np.tile(np.asarray(neg, np.float32), (n, 1))
    if image is not None:
        batch["image"] = rep(images_per_prompt(image, len(prompts), height, width))
    if mask_image is not None:
        mask = images_per_prompt(mask_image, len(prompts), height, width, grayscale=True)
        batch["mask"] = rep((mask >= 0.5).astype(np.float32))  # VaeImageProcessor do_binarize

    sampler, options, schedule = resolve_sampler(
        sd.model.scheduler_config, sampler, sampler_options
    )
    if mode == "img2img" or start_step:
        # diffusers' img2img noises the init latents even at strength 1 (add_noise at the first
        # timestep); only inpainting at strength 1 starts from pure noise (`is_strength_max`).
        check_img2img_support(sampler)
        options["start_step"] = start_step
    key_options = tuple(sorted(options.items()))
    static = key_options + (
        ("clip_skip", clip_skip),
        ("guidance_rescale_on", guidance_rescale != 0),
        ("progress", progress),
    )
    key = (sampler, num_inference_steps, static, mode)
    if key not in sd._compiled:
        sd._compiled[key] = _build_fn(sd, sampler, num_inference_steps, static, mode, schedule)
    fn = sd._compiled[key]

    params = {
        "unet": model.unet_params,
        "vae": model.vae_params,
        "text": tuple(model.text_encoder_params),
    }
    devices = sd.mesh.devices.size
    batch_size = -(-min(batch_size, n) // devices) * devices
    starts = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm

        count_key = (sampler, num_inference_steps, key_options)
        if count_key not in sd._evaluations:
            sd._evaluations[count_key] = _count_evaluations(
                sampler, num_inference_steps, key_options, schedule
            )
        total = sd._evaluations[count_key] * len(starts)
        sd._progress[0] = tqdm(total=total, desc="denoising", unit="step")
    out = []
    try:
        for start in starts:
            chunk = jax.tree.map(lambda a: _pad(a[start : start + batch_size], batch_size), batch)
            out.append(np.asarray(fn(params, chunk))[: min(batch_size, n - start)])
    finally:
        if sd._progress[0] is not None:
            jax.effects_barrier()
            sd._progress[0].close()
            sd._progress[0] = None
    return np.concatenate(out)


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    """Pad the leading axis to `size` by repeating the last row (a fixed shape: no recompiles)."""
    return np.concatenate([a, np.repeat(a[-1:], size - len(a), axis=0)]) if len(a) < size else a
