"""Argument parsing and checks shared by the `ldm-jax` commands (the modules of this package):
each check runs before any model is loaded and names the argument that is wrong."""

from __future__ import annotations

import math
import os
import pathlib


def check_inputs(args) -> None:
    """The evaluation inputs that were given exist: --images and --clip folders, --reference and
    --inception-weights files (or the file $LDM_JAX_INCEPTION_WEIGHTS names)."""
    paths = [(f"--{name}", getattr(args, name, None), kind) for name, kind in _INPUTS]
    if hasattr(args, "inception_weights"):
        env = os.environ.get("LDM_JAX_INCEPTION_WEIGHTS")
        flag = "--inception-weights" if args.inception_weights else "$LDM_JAX_INCEPTION_WEIGHTS"
        paths.append((flag, args.inception_weights or env, "file"))
    for flag, path, kind in paths:
        if path and not (
            pathlib.Path(path).is_dir() if kind == "folder" else pathlib.Path(path).is_file()
        ):
            raise FileNotFoundError(f"{flag} {path}: no such {kind}")


_INPUTS = (("images", "folder"), ("clip", "folder"), ("reference", "file"))


def check_counts(args, *names: str) -> None:
    """Each named argument (or each of its values), when given, is an integer >= 1."""
    for name in names:
        values = getattr(args, name, None)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def check_finite(args, *names: str) -> None:
    """Each named float argument, when given, is finite (not nan or inf)."""
    for name in names:
        values = getattr(args, name, None)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and not math.isfinite(value):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value}")


def check_seed(seed: int, num_images: int) -> None:
    """Image i uses seed K + i: all of them must be valid uint32 seeds."""
    from ldm_jax.rng import SEED_MAX

    if not 0 <= seed <= SEED_MAX - (num_images - 1):
        raise ValueError(
            f"--seed must be in [0, {SEED_MAX - (num_images - 1)}] for {num_images} images "
            f"(image i uses seed K + i; seeds are uint32), got {seed}"
        )


def sampler_options(pairs: list[str]) -> dict:
    """["eta=0.5", "use_karras_sigmas=True"] -> {"eta": 0.5, "use_karras_sigmas": True}."""
    import ast

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--sampler-option takes KEY=VALUE, got {pair!r}")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value  # a bare word, e.g. timestep_spacing=trailing
    return options


def add_sampling_args(
    p, steps=25, workdir_required=True, sampler_default="ddim", batch_default: int | None = 32
):
    p.add_argument("--workdir", required=workdir_required, help="an `ldm` training run")
    p.add_argument(
        "--steps",
        type=int,
        default=steps,
        help="denoising steps"
        + (
            ""
            if steps
            else " (default: the run's config.sample.num_steps; diffusers' 50 for a checkpoint)"
        ),
    )
    p.add_argument(
        "--sampler",
        default=sampler_default,
        help="sampler name (see ldm_jax.diffusion.samplers)"
        + ("" if sampler_default else "; default: ddim, or the checkpoint's scheduler"),
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--batch-size",
        type=int,
        default=batch_default,
        help="images per compiled batch" + ("" if batch_default else " (default 32; 8 pretrained)"),
    )


def add_lora_arg(p) -> None:
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:WEIGHT]",
        help="a diffusers / PEFT or kohya LoRA file fused into the model, with its weight "
        "(default 1); repeat for several",
    )


def check_lora_files(args) -> list[tuple[str, float]]:
    """The --lora (file, weight) pairs, each file checked to exist."""
    from ldm_jax.model import parse_lora

    loras = [parse_lora(spec) for spec in args.lora]
    for path, _ in loras:
        if not pathlib.Path(path).is_file():
            raise FileNotFoundError(f"no such --lora file: {path}")
    return loras
