"""`ldm-jax sample`: one path for a run trained here (--workdir) and a checkpoint (--pretrained),
through `ldm_jax.pipeline.generate`; optionally handing off to an SDXL refiner."""

from __future__ import annotations

import pathlib
import time

from ldm_jax.cli import args as args_lib


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sample", help="text-to-image with a model trained here or a pretrained checkpoint"
    )
    args_lib.add_sampling_args(
        p, steps=None, workdir_required=False, sampler_default=None, batch_default=None
    )
    p.add_argument(
        "--pretrained",
        help="a diffusers folder or a single-file checkpoint (.safetensors / .ckpt) of SD 1.x, "
        "2.x or XL, instead of --workdir",
    )
    p.add_argument("--variant", help="weights variant of a diffusers folder, e.g. fp16")
    p.add_argument("--tokenizer", help="tokenizer folder for a single-file checkpoint")
    p.add_argument("--tokenizer-2", help="second tokenizer folder (SDXL single files)")
    p.add_argument("--prompt", action="append", default=[], help="repeat for several prompts")
    p.add_argument("--prompt-file", help="a text file of prompts, one per line (after --prompt)")
    p.add_argument(
        "--negative-prompt",
        action="append",
        default=[],
        help="one for all prompts, or one per --prompt",
    )
    p.add_argument("--num-images", type=int, default=4, help="images per prompt")
    p.add_argument(
        "--sampler-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a sampler option in diffusers' vocabulary, e.g. eta=0.5 or use_karras_sigmas=True",
    )
    p.add_argument(
        "--guidance-scale",
        type=float,
        help="default: the run's config.sample.guidance_scale (shapes 4, a distilled student 1); "
        "7.5 for --pretrained; <= 1: the conditional model alone (diffusers')",
    )
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="Lin et al. 2024 phi")
    p.add_argument("--height", type=int, help="pixels (default: the model's training size)")
    p.add_argument("--width", type=int, help="pixels (default: the model's training size)")
    p.add_argument("--clip-skip", type=int, help="text-encoder layers to skip (diffusers')")
    p.add_argument("--init-image", help="img2img / inpainting: the starting picture")
    p.add_argument(
        "--strength",
        type=float,
        help="img2img: fraction of the steps to run (default 0.8; inpainting 1.0)",
    )
    p.add_argument("--mask", help="inpainting mask image: white = repaint")
    p.add_argument(
        "--refiner",
        help="a refiner checkpoint (SDXL's) that takes over at --denoising-end (diffusers' "
        "ensemble of expert denoisers)",
    )
    p.add_argument(
        "--denoising-end",
        type=float,
        help="with --refiner: the fraction of the noise schedule the base denoises, e.g. 0.8",
    )
    args_lib.add_lora_arg(p)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(fn=run)


def run(args, overrides):
    """`sample`: one path for a run trained here (--workdir) and a checkpoint (--pretrained),
    optionally handing off to a --refiner at --denoising-end."""
    del overrides
    from ldm_jax import model as model_lib
    from ldm_jax import runs
    from ldm_jax.pipeline import generate

    sampler_options = _check_sample_args(args)
    runs.check_output_dir(args.out)
    if args.pretrained is not None:
        model = _load_pretrained(args, args.pretrained)
        source = {"pretrained": str(args.pretrained)}
    else:
        model = model_lib.load_run(args.workdir)
        source = {"workdir": str(args.workdir)}
    loras = args.loras
    model = model_lib.with_lora(model, loras)  # (checks the files before any sampling)
    if loras:
        source["lora"] = [{"file": str(f), "weight": w} for f, w in loras]
    refiner = _load_pretrained(args, args.refiner) if args.refiner else None
    out = runs.output_dir(args.out)
    # Defaults from the model: a run's own sample settings (shapes: 25 steps, guidance 4; a
    # distilled student: its step count, guidance 1), diffusers' for a checkpoint.
    defaults = {**model_lib.PRETRAINED_SAMPLING, **model.sampling}
    steps = args.steps or defaults["num_inference_steps"]
    guidance = defaults["guidance_scale"] if args.guidance_scale is None else args.guidance_scale
    sampler = args.sampler or defaults.get("sampler")
    if sampler is None:  # the checkpoint's own scheduler; checks the options before compiling
        from ldm_jax.diffusion.samplers.options import resolve_sampler

        sampler = resolve_sampler(model.scheduler_config, None, sampler_options)[0]
    mode = "inpaint" if args.mask is not None else "img2img" if args.init_image else "txt2img"
    strength = args.strength if args.strength is not None else {"img2img": 0.8}.get(mode, 1.0)
    common = dict(
        negative_prompt=args.negative_prompt or None,
        num_inference_steps=steps,
        guidance_scale=guidance,
        guidance_rescale=args.guidance_rescale,
        height=args.height,
        width=args.width,
        num_images_per_prompt=args.num_images,
        seed=args.seed,
        sampler=sampler,
        sampler_options=sampler_options,
        # Runs trained here are small: larger batches use the cores better.
        batch_size=args.batch_size or (32 if model.config is not None else 8),
        progress=True,
    )
    start = time.perf_counter()
    images = generate(
        model,
        args.prompt,
        clip_skip=args.clip_skip,
        image=args.init_image,
        mask_image=args.mask,
        strength=strength,
        denoising_end=args.denoising_end,
        output_type="latent" if refiner is not None else "uint8",
        **common,
    )
    if refiner is not None:  # the ensemble of experts: the refiner takes the last steps
        # at the base's size, whatever the refiner's own default is
        size = {
            k: n * refiner.vae_scale_factor for k, n in zip(("height", "width"), images.shape[1:3])
        }
        images = generate(
            refiner, args.prompt, image=images, denoising_start=args.denoising_end,
            **{**common, **size},
        )  # fmt: skip
        source.update(refiner=str(args.refiner), denoising_end=args.denoising_end)
    seconds = time.perf_counter() - start
    settings = dict(
        sampler=sampler,
        steps=steps,
        guidance_scale=guidance,
        guidance_rescale=args.guidance_rescale,
        height=int(images.shape[1]),
        width=int(images.shape[2]),
        **source,
    )
    records = _sample_records(args, settings, sampler_options, strength)
    runs.save_outputs(images, records, out, grid_columns=args.num_images)
    print(
        f"wrote {len(images)} images, grid.png and manifest.json to {out} "
        f"({len(images) / seconds:.2f} images/s including compilation)"
    )


def _sample_records(args, settings: dict, sampler_options: dict, strength: float) -> list:
    """One manifest record per image (prompt-major, image i from seed K + i): one schema for
    runs trained here ("workdir") and checkpoints ("pretrained", "refiner")."""
    if sampler_options:
        settings["sampler_options"] = sampler_options
    if args.clip_skip is not None:
        settings["clip_skip"] = args.clip_skip
    if args.init_image is not None:
        settings.update(init_image=str(args.init_image), strength=strength)
    if args.mask is not None:
        settings["mask"] = str(args.mask)
    negatives = args.negative_prompt or [""]
    negatives = negatives * len(args.prompt) if len(negatives) == 1 else negatives
    return [
        {
            "prompt": prompt,
            "negative_prompt": negative,
            "seed": args.seed + i * args.num_images + j,
            **settings,
        }
        for i, (prompt, negative) in enumerate(zip(args.prompt, negatives))
        for j in range(args.num_images)
    ]


def _load_pretrained(args, path):
    from ldm_jax import model as model_lib

    model = model_lib.load_pretrained(
        path, variant=args.variant, tokenizer_dir=args.tokenizer, tokenizer_2_dir=args.tokenizer_2
    )
    model.get_tokenizers()  # a single file without --tokenizer: say so before compiling
    return model


def _check_sample_args(args) -> dict:
    """The `sample` arguments' errors that need no model (counts, files, pairings, the sampler's
    name and options); returns the sampler options."""
    if args.prompt_file:  # e.g. 30k COCO captions for FID: one prompt per line
        path = pathlib.Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"no such --prompt-file: {path}")
        args.prompt = args.prompt + [line for line in path.read_text().splitlines() if line.strip()]
    if not args.prompt:
        raise ValueError("give at least one --prompt (or a --prompt-file)")
    args.loras = args_lib.check_lora_files(args)
    args_lib.check_counts(args, "num_images", "steps", "batch_size")
    args_lib.check_finite(args, "guidance_scale", "guidance_rescale", "strength")
    if args.strength is not None and not 0 < args.strength <= 1:
        raise ValueError(f"--strength must be in (0, 1], got {args.strength}")
    args_lib.check_seed(args.seed, len(args.prompt) * args.num_images)
    if (args.workdir is None) == (args.pretrained is None):
        raise ValueError("give exactly one of --workdir (a run trained here) and --pretrained")
    sampler_options = args_lib.sampler_options(args.sampler_option)
    if args.sampler is not None:  # before loading anything: a typo costs no model load
        from ldm_jax.diffusion.samplers.options import check_sampler_options

        check_sampler_options(args.sampler, sampler_options)
    negatives = args.negative_prompt or [""]
    if len(negatives) not in (1, len(args.prompt)):
        raise ValueError(f"give one --negative-prompt, or one per --prompt ({len(args.prompt)})")
    if args.workdir is not None and args.refiner is None:
        loading = {"--variant": args.variant, "--tokenizer": args.tokenizer}
        loading["--tokenizer-2"] = args.tokenizer_2
        given = [k for k, v in loading.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --pretrained")
    for flag, path in (("--pretrained", args.pretrained), ("--refiner", args.refiner)):
        if path is not None and not pathlib.Path(path).exists():
            raise FileNotFoundError(f"{flag} {path}: no such file or folder")
    if (args.refiner is None) != (args.denoising_end is None):
        raise ValueError("--refiner and --denoising-end go together (the base stops there)")
    if args.denoising_end is not None and not 0 < args.denoising_end < 1:
        raise ValueError(f"--denoising-end must be in (0, 1), got {args.denoising_end}")
    if args.strength is not None and args.init_image is None:
        raise ValueError("--strength needs --init-image (img2img)")
    if args.mask is not None and args.init_image is None:
        raise ValueError("--mask needs --init-image (the picture to inpaint)")
    for flag, path in (("--init-image", args.init_image), ("--mask", args.mask)):
        if path is not None and not pathlib.Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file")
    return sampler_options
