"""Prompts -> images for every `ldm_jax.model.Model`: a run trained here or a pretrained Stable
Diffusion checkpoint (SD 1.x, 2.x, XL, XL refiner, inpainting), text-to-image, img2img and
inpainting.

  model = load_run("runs/shapes/ldm")   # or load_pretrained("models/stable-diffusion-v1-5")
  images = generate(model, "a red circle", num_inference_steps=25, seed=0)  # uint8[1, H, W, 3]

Arguments and their meaning follow diffusers' `StableDiffusionPipeline`,
`StableDiffusionXLPipeline`, `...Img2ImgPipeline` and `...InpaintPipeline` (diffusers 0.42), so
that the same prompt, initial latents and deterministic sampler give the same image (checked in
tests/test_generate.py against tiny random diffusers pipelines). Defaults come from the model: a
run's own `config.sample` (sampler, steps, guidance; a distilled student's step grid), a
checkpoint's scheduler config and diffusers' pipeline defaults.

Text encoding, the whole denoising loop and the VAE run in one jitted function per (sampler,
steps, sampler options, image size, mode, batch size); prompts, seeds, guidance scales, SDXL
micro-conditioning and init images are traced arguments and do not recompile. Conditional and
unconditional passes share one U-Net batch, and each batch is split over the mesh's data axis
(a run's parameters keep the layout its sharding rules give them).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import rng as rng_lib
from ldm_jax import sharding as sharding_lib
from ldm_jax.data.tokenizers import token_ids
from ldm_jax.diffusion import samplers as sampler_lib
from ldm_jax.diffusion.guidance import classifier_free_guidance
from ldm_jax.diffusion.samplers import options as options_lib
from ldm_jax.images import images_per_prompt
from ldm_jax.model import PRETRAINED_SAMPLING, Model, encode_prompt, with_lora

log = logging.getLogger("ldm_jax")


def _as_list(value, name: str) -> list:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} must be a string or a list of strings, got {type(value)}")
    return list(value)


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


def _build_fn(model: Model, sampler: str, num_steps: int, options: tuple, mode: str, schedule):
    """jit(params, batch) -> uint8[B, H, W, 3]; see `generate` for the batch fields."""
    sample = sampler_lib.get_sampler(sampler)
    options = dict(options)
    clip_skip = options.pop("clip_skip", None)
    rescale_on = options.pop("guidance_rescale_on", False)
    # The host callback only when a bar is shown: executables with host callbacks are not
    # written to the persistent compilation cache.
    ticks = options.pop("progress", False)
    output_type = options.pop("output_type", "uint8")
    progress = model.cache.setdefault("progress", [None])  # read by the host callback, so a
    # new bar does not retrace

    def tick():
        if progress[0] is not None:
            progress[0].update(1)

    def fn(params, batch):
        scale = params["scale"]
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
            f = model.vae_scale_factor
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
        if "image_latents" in batch:  # latents given (a refiner continuing the base's)
            kwargs["init_latents"] = batch["image_latents"]
        elif "start_step" in options:  # img2img, or inpainting with strength < 1
            kwargs["init_latents"] = vae_latents(batch["image"] * 2 - 1, 1)
        rng = jax.random.fold_in(jax.random.key(batch["seed"][0]), 3)
        latents = sample(model_fn, batch["noise"], schedule, num_steps, rng, **kwargs)
        if output_type == "latent":
            return latents
        images = model.vae.apply(params["vae"], latents / scale, method=model.vae.decode)
        # diffusers' postprocess: (x / 2 + 0.5).clamp(0, 1), then (x * 255).round() to uint8.
        return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    return fn


def _params(model: Model) -> dict:
    return {
        "unet": model.unet_params,
        "vae": model.vae_params,
        "text": tuple(model.text_encoder_params),
        "scale": np.float32(model.scaling_factor),
    }


def _compile(model: Model, mesh, fn):
    """jit with the batch split over the mesh's data axes; parameters replicated, or (a run
    trained here) in the layout of its sharding rules, e.g. FSDP."""
    data = sharding_lib.batch_sharding(mesh)
    params = _params(model)
    if model.sharding_rules is None:
        shardings = sharding_lib.replicated(mesh)
    else:
        shardings = sharding_lib.tree_shardings(params, mesh, model.sharding_rules)
    return jax.jit(fn, in_shardings=(shardings, data), out_shardings=data)


# --- generate ------------------------------------------------------------------------------------


def _latent_shape(model: Model, height: int, width: int) -> tuple[int, int, int]:
    """(h, w, c) of the latents of height x width images; both must fit the U-Net's levels."""
    f = model.vae_scale_factor * 2 ** (len(model.unet.block_out_channels) - 1)
    if height % f or width % f:
        raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
    s = model.vae_scale_factor
    return height // s, width // s, model.vae.latent_channels


def _strength(mode: str, strength, denoising_start, image, latent_shape, size) -> float:
    """The strength generate runs at (diffusers' defaults: 0.8 for img2img, else 1; a
    `denoising_start` overrides it), its inputs checked."""
    if strength is None or denoising_start is not None:  # diffusers: the latter overrides
        strength = 0.8 if mode == "img2img" and denoising_start is None else 1.0
    if mode == "txt2img" and strength != 1:
        raise ValueError("strength needs an init image")
    if mode == "txt2img" and denoising_start is not None:
        raise ValueError("denoising_start needs image (the latents of the previous stage)")
    if denoising_start is not None and not _is_latents(image, latent_shape):
        got = getattr(image, "shape", type(image).__name__)
        raise ValueError(
            f"denoising_start continues from latents [N, {', '.join(map(str, latent_shape))}] "
            f"(height x width {size[0]}x{size[1]}); got {got}"
        )
    return strength


def _text_and_noise(model, texts, per: int, seed, latents, latent_shape, zero_uncond) -> dict:
    """Token ids (prompts, negative prompts), initial noise and seeds of every image."""
    tokenizers = model.get_tokenizers()
    n = len(texts[0][0]) * per
    rep = lambda a: np.repeat(np.asarray(a), per, axis=0)
    seeds = [int(seed) + i for i in range(n)] if isinstance(seed, int | np.integer) else list(seed)
    if len(seeds) != n:
        raise ValueError(f"give one seed or one per image ({n}), got {len(seeds)}")
    seeds = rng_lib.seed_array(seeds)
    return {
        "ids": tuple(rep(token_ids(t, p)) for t, (p, _) in zip(tokenizers, texts)),
        "neg_ids": tuple(rep(token_ids(t, neg)) for t, (_, neg) in zip(tokenizers, texts)),
        "neg_zero": np.full(n, zero_uncond, "f4"),
        "noise": _noise(latents, seeds, latent_shape),
        "seed": seeds,
    }


def generate(
    model: Model,
    prompt: str | Sequence[str],
    *,
    negative_prompt: str | Sequence[str] | None = None,
    prompt_2: str | Sequence[str] | None = None,
    negative_prompt_2: str | Sequence[str] | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | Sequence[float] | None = None,
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
    denoising_start: float | None = None,
    denoising_end: float | None = None,
    lora: Sequence | None = None,
    output_type: str = "uint8",
    batch_size: int = 8,
    progress: bool = False,
) -> np.ndarray:
    """Images for prompts -> uint8[len(prompts) * num_images_per_prompt, height, width, 3],
    prompt-major (diffusers' order: p0, p0, p1, p1 for two images per prompt).

    num_inference_steps, guidance_scale, sampler: default to the model's (`Model.sampling`: a
    run's config.sample; diffusers' 50 steps and 7.5 with the checkpoint's own scheduler).
    guidance_scale: one value or one per image; <= 1 is the conditional model alone (diffusers':
    the unconditional model is the empty prompt at guidance 1). sampler_options: the sampler's
    keyword options (a run's own `config.sample.sampler_options` apply to its own sampler).
    prompt_2 / negative_prompt_2: SDXL's prompts for the second text encoder (default: the
    first ones), as diffusers' StableDiffusionXLPipeline.

    seed: an int (image i uses seed + i) or one seed per image; `latents` (f32[N, h, w, c], NHWC,
    standard normal, diffusers' `latents` transposed) replace the seeded noise. `image` alone is
    img2img (`strength`, default 0.8: diffusers' truncation, the first
    num_inference_steps - int(num_inference_steps * strength) steps are skipped); with `mask_image`
    (white = repaint) it is inpainting (default strength 1.0) and needs a 9-channel inpainting
    U-Net. SDXL: original_size / crops_coords_top_left / target_size micro-conditioning (default
    (height, width), (0, 0), (height, width)); the refiner uses aesthetic scores instead of
    target_size. batch_size: images per compiled batch, rounded up to a multiple of the devices.

    An ensemble of expert denoisers (SDXL base + refiner, diffusers' definitions):
    `denoising_end=0.8, output_type="latent"` stops the base at the cut-off timestep and returns
    its latents f32[N, h, w, c] (scaled, NHWC); `image=<those latents>, denoising_start=0.8` on
    the refiner continues from them without re-noising (strength is then ignored). `image` may be
    latents f32[N, h, w, c] in general (no VAE encoding). See `handoff_steps`.

    lora: LoRA files fused into the U-Net for this call, [(file, weight) or file, ...]
    (`model.with_lora`; the model itself is not changed).
    """
    if output_type not in ("uint8", "latent"):
        raise ValueError(f"output_type must be 'uint8' or 'latent', got {output_type!r}")
    model.get_tokenizers()  # a single file without its tokenizer folder: say so first
    if lora:
        model = with_lora(model, lora)
    defaults = {**PRETRAINED_SAMPLING, **model.sampling}
    steps = defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps
    if guidance_scale is None:
        guidance_scale = defaults["guidance_scale"]
    sampler, sampler_options = _sampler_choice(model, sampler, sampler_options, steps)
    prompts = _as_list(prompt, "prompt")
    texts = _texts(model, prompts, negative_prompt, prompt_2, negative_prompt_2)
    per = num_images_per_prompt
    n = len(prompts) * per
    guidance = np.broadcast_to(np.asarray(guidance_scale, np.float32), (n,)).copy()
    _check_numbers(steps, per, guidance, guidance_rescale, clip_skip)
    height, width = height or model.default_size, width or model.default_size
    latent_shape = _latent_shape(model, height, width)
    mode = _mode(model, image, mask_image)
    strength = _strength(mode, strength, denoising_start, image, latent_shape, (height, width))

    # Per-image host arrays (N = prompts x images per prompt, prompt-major).
    zero_uncond = negative_prompt is None and model.force_zeros_for_empty_prompt
    batch = _text_and_noise(model, texts, per, seed, latents, latent_shape, zero_uncond)
    # diffusers guides only when guidance_scale > 1 and otherwise runs the conditional model,
    # which is guidance 1 here.
    batch["guidance"] = np.maximum(guidance, 1.0)
    batch["rescale"] = np.full(n, guidance_rescale, np.float32)
    if model.is_sdxl:
        size = (height, width)
        batch.update(
            _time_ids(
                model, n, original_size or size, crops_coords_top_left, target_size or size,
                aesthetic_score, negative_aesthetic_score,
            )
        )  # fmt: skip
    batch.update(_image_inputs(image, mask_image, len(prompts), per, (height, width), latent_shape))

    sampler, options, schedule = options_lib.resolve_sampler(
        model.scheduler_config, sampler, sampler_options
    )
    start_step = options_lib.img2img_start_step(steps, strength)
    if mode == "img2img" or start_step:
        # diffusers' img2img noises the init latents even at strength 1 (add_noise at the first
        # timestep); only inpainting at strength 1 starts from pure noise (`is_strength_max`).
        options_lib.check_img2img_support(sampler)
        options["start_step"] = start_step
    if denoising_start is not None or denoising_end is not None:
        options.update(
            _handoff(model, sampler, steps, options, schedule, denoising_start, denoising_end)
        )
    static = tuple(sorted(options.items())) + (
        ("clip_skip", clip_skip),
        ("guidance_rescale_on", guidance_rescale != 0),
        ("progress", progress),
        ("output_type", output_type),
    )
    return _run(model, (sampler, steps, static, mode, schedule), batch, n, batch_size, progress)


def _check_numbers(steps, per, guidance, guidance_rescale, clip_skip):
    if steps < 1 or per < 1:
        raise ValueError(
            f"num_inference_steps and num_images_per_prompt must be >= 1, got {steps}, {per}"
        )
    for name, value in (("guidance_scale", guidance), ("guidance_rescale", guidance_rescale)):
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{name} must be finite, got {value}")
    if clip_skip is not None and clip_skip < 0:
        raise ValueError(f"clip_skip must be >= 0, got {clip_skip}")


def _noise(latents, seeds, latent_shape) -> np.ndarray:
    """The initial latents: given (f32[N, h, w, c], diffusers' `latents` transposed), or drawn
    from each image's seed."""
    if latents is None:
        return initial_noise(seeds, latent_shape)
    noise = np.asarray(latents, np.float32)
    if noise.shape != (len(seeds), *latent_shape):
        raise ValueError(
            f"latents must be [N, h, w, c] = {(len(seeds), *latent_shape)}, got {noise.shape}"
        )
    return noise


def _image_inputs(image, mask_image, num_prompts: int, per: int, size, latent_shape) -> dict:
    """img2img / inpainting inputs per image: pictures f32[N, H, W, 3] in [0, 1] (one for all
    prompts or one per prompt) or latents f32[N, h, w, c]; a binarized mask f32[N, H, W, 1]."""
    rep = lambda a: np.repeat(np.asarray(a), per, axis=0)
    n = num_prompts * per
    out = {}
    if _is_latents(image, latent_shape):
        if mask_image is not None:
            raise ValueError("inpainting needs the picture as image, not latents")
        image = np.asarray(image, np.float32)
        if len(image) not in (n, num_prompts):
            raise ValueError(f"give latents for each image ({n}), got {len(image)}")
        out["image_latents"] = image if len(image) == n else rep(image)
    elif image is not None:
        out["image"] = rep(images_per_prompt(image, num_prompts, *size))
    if mask_image is not None:
        mask = images_per_prompt(mask_image, num_prompts, *size, grayscale=True)
        out["mask"] = rep((mask >= 0.5).astype(np.float32))  # VaeImageProcessor do_binarize
    return out


def _sampler_choice(model: Model, sampler, sampler_options, steps: int):
    """(sampler, options): the model's own sampler and its options unless another is named;
    a warning when a distilled student is sampled otherwise than it was distilled for."""
    own = model.sampling.get("sampler")
    sampler = sampler or own
    if sampler is not None and sampler == own:  # the run's own defaults (a student's DDIM grid)
        sampler_options = {**model.sampling.get("sampler_options", {}), **(sampler_options or {})}
    config = model.config
    if config is not None and config.stage == "distill":
        distilled = config.distill.student_steps
        if (sampler, steps) != ("ddim", distilled):
            log.warning(
                "this student was distilled for %d DDIM steps, not %s at %d steps",
                distilled,
                sampler,
                steps,
            )
    return sampler, sampler_options


def _texts(model: Model, prompts, negative_prompt, prompt_2, negative_prompt_2) -> list:
    """[(prompts, negative prompts)] per text encoder, each one per prompt."""

    def per_prompt(texts, name, default):
        texts = default if texts is None else _as_list(texts, name)
        texts = texts * len(prompts) if len(texts) == 1 else texts
        if len(texts) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(texts)} {name.replace('_', ' ')}s")
        return texts

    if not model.is_sdxl and (prompt_2 is not None or negative_prompt_2 is not None):
        raise ValueError("prompt_2 / negative_prompt_2 are for SDXL's second text encoder")
    negatives = per_prompt(negative_prompt, "negative_prompt", [""])
    # SDXL's second encoder reads prompt_2 / negative_prompt_2 if given.
    second = (
        per_prompt(prompt_2, "prompt_2", prompts),
        per_prompt(negative_prompt_2, "negative_prompt_2", negatives),
    )
    return [(prompts, negatives)] + [second] * (len(model.text_encoders) - 1)


def _is_latents(image, latent_shape) -> bool:
    """Whether `image` is latents f32[N, h, w, c] rather than pictures (a handoff's input)."""
    return hasattr(image, "shape") and np.ndim(image) == 4 and image.shape[1:] == latent_shape


def _handoff(model: Model, sampler, steps, options, schedule, denoising_start, denoising_end):
    """The sampler options of a base / refiner split (`options_lib.handoff_steps`)."""
    options_lib.check_handoff_support(sampler)
    key = (sampler, steps, tuple(sorted(options.items())))
    timesteps = model.cache.setdefault("call_timesteps", {})
    if key not in timesteps:
        full = {k: v for k, v in options.items() if k != "start_step"}
        timesteps[key] = options_lib.call_timesteps(sampler, steps, tuple(full.items()), schedule)
    start, end = options_lib.handoff_steps(
        timesteps[key], steps, schedule.num_train_timesteps, denoising_start, denoising_end
    )
    out = {}
    if start is not None:  # continue from the given latents as they are
        out.update(start_step=start, add_noise=False)
    if end is not None:
        out["end_step"] = end
    return out


def _mode(model: Model, image, mask_image) -> str:
    """ "txt2img", "img2img" or "inpaint", checked against the U-Net's inputs."""
    if mask_image is not None:
        if image is None:
            raise ValueError("mask_image needs image (the picture to inpaint)")
        if not model.is_inpainting:
            raise ValueError(
                f"inpainting needs a 9-channel inpainting U-Net; this {model.kind} model's "
                f"U-Net takes {model.unet.in_channels} channels"
            )
        return "inpaint"
    if model.is_inpainting:
        raise ValueError(f"the {model.kind} checkpoint is an inpainting model: give mask_image")
    return "img2img" if image is not None else "txt2img"


def _time_ids(model: Model, n, original_size, crops, target_size, aesthetic, neg_aesthetic):
    """SDXL's micro-conditioning f32[n, 6] (`_get_add_time_ids`): original size, crop corner and
    target size; the refiner's (img2img pipeline's) an aesthetic score instead of the target."""
    base = tuple(original_size) + tuple(crops)
    if model.requires_aesthetics_score:
        ids, neg = base + (aesthetic,), base + (neg_aesthetic,)
    else:
        ids = neg = base + tuple(target_size)
    return {
        "time_ids": np.tile(np.asarray(ids, np.float32), (n, 1)),
        "neg_time_ids": np.tile(np.asarray(neg, np.float32), (n, 1)),
    }


def _run(model: Model, key: tuple, batch: dict, n: int, batch_size: int, progress: bool):
    """The compiled function for `key` (built once per model modules and mesh) over padded
    batches of `batch_size` images."""
    sampler, steps, static, mode, schedule = key
    mesh = model.mesh if model.mesh is not None else model.cache.setdefault(
        "mesh", sharding_lib.make_mesh({"data": -1})
    )  # fmt: skip
    modules = (id(model.unet), id(model.vae), *map(id, model.text_encoders), id(mesh))
    compiled = model.cache.setdefault("compiled", {})
    full_key = (modules, sampler, steps, static, mode)
    if full_key not in compiled:
        fn = _build_fn(model, sampler, steps, static, mode, schedule)
        compiled[full_key] = _compile(model, mesh, fn)
    fn = compiled[full_key]
    devices = mesh.devices.size
    batch_size = -(-min(batch_size, n) // devices) * devices
    starts = range(0, n, batch_size)
    bar = model.cache.setdefault("progress", [None])
    if progress:
        from tqdm import tqdm

        counts = model.cache.setdefault("evaluations", {})
        options = tuple(o for o in static if o[0] not in _HOST_ONLY)
        if (sampler, steps, options) not in counts:
            counts[sampler, steps, options] = options_lib.count_evaluations(
                sampler, steps, options, schedule
            )
        total = counts[sampler, steps, options] * len(starts)
        bar[0] = tqdm(total=total, desc="denoising", unit="step")
    params = _params(model)
    out = []
    try:
        for start in starts:
            chunk = jax.tree.map(lambda a: _pad(a[start : start + batch_size], batch_size), batch)
            out.append(np.asarray(fn(params, chunk))[: min(batch_size, n - start)])
    finally:
        if bar[0] is not None:
            jax.effects_barrier()
            bar[0].close()
            bar[0] = None
    return np.concatenate(out)


# Static entries of the compile key that are not sampler options.
_HOST_ONLY = ("clip_skip", "guidance_rescale_on", "progress", "output_type")


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    """Pad the leading axis to `size` by repeating the last row (a fixed shape: no recompiles)."""
    return np.concatenate([a, np.repeat(a[-1:], size - len(a), axis=0)]) if len(a) < size else a
