"""Which sampler runs with which options: a checkpoint's `scheduler_config.json` read as diffusers
reads it (`resolve_sampler`), the options a sampler takes, and img2img's truncation of the steps.
Used by `ldm_jax.pipeline.generate` and the CLI's early checks."""

from __future__ import annotations

import inspect
import logging

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.samplers import get_sampler
from ldm_jax.diffusion.schedules import (
    SCHEDULER_CLASSES,
    SD_SCHEDULER_DEFAULTS,
    NoiseSchedule,
    sampler_from_scheduler_config,
)

log = logging.getLogger("ldm_jax")

# Options that every sampler takes; the ones passed to samplers not in SCHEDULER_CLASSES.
COMMON_OPTIONS = ("prediction_type", "timestep_spacing", "steps_offset")

# Sampler options that img2img needs; see `check_img2img_support`.
IMG2IMG_OPTIONS = ("start_step", "init_latents")
# ... and those a base / refiner handoff needs (`handoff_steps`).
HANDOFF_OPTIONS = ("end_step", "add_noise")


def call_timesteps(sampler: str, num_steps: int, options: tuple, schedule) -> np.ndarray:
    """The timestep of each network evaluation of one run, in order: diffusers' `timesteps` list
    (for Heun and DPM2 the interleaved one, t_0, t_1, t_1, t_2, ...). Read by running the
    sampler on a 1-element latent with a stand-in network that reports its t (the loop is
    compiled, so tracing alone cannot see them)."""
    calls = []
    options = dict(options)
    if "start_step" in options:
        options["init_latents"] = jnp.zeros((1, 1, 1, 1))

    def model_fn(x, t):
        jax.debug.callback(lambda t: calls.append(float(t[0])), t)
        return 0.1 * x

    noise = jnp.ones((1, 1, 1, 1))
    run = jax.jit(
        lambda n: get_sampler(sampler)(
            model_fn, n, schedule, num_steps, jax.random.key(0), **options
        )
    )
    jax.block_until_ready(run(noise))
    jax.effects_barrier()
    return np.asarray(calls, np.float64)


def count_evaluations(sampler: str, num_steps: int, options: tuple, schedule) -> int:
    """Network evaluations of one run (for the progress bar)."""
    return len(call_timesteps(sampler, num_steps, options, schedule))


def handoff_steps(
    calls: np.ndarray,
    num_steps: int,
    num_train_timesteps: int,
    denoising_start: float | None,
    denoising_end: float | None,
) -> tuple[int | None, int | None]:
    """(start_step, end_step) sampler options for an ensemble of expert denoisers (Balaji et al.
    2022, eDiff-I; SDXL's base + refiner, Podell et al. 2023), as diffusers defines the split.

    calls: `call_timesteps` of the full run. denoising_end (the base): run diffusers'
    `timesteps[:k]`, k = the entries >= round(T (1 - denoising_end)). denoising_start (the
    refiner, `StableDiffusionXLImg2ImgPipeline.get_timesteps`): keep the entries below
    round(T (1 - denoising_start)), one more for a second-order sampler when their count is
    even (so the run ends after a second stage), and start there. start_step is in steps,
    end_step in loop iterations (network calls), as the samplers take them.
    """
    n = len(calls)
    order = 2 if num_steps > 1 and n == 2 * num_steps - 1 else 1
    cutoff = lambda fraction: int(round(num_train_timesteps - fraction * num_train_timesteps))
    begin, start_step, end_step = 0, None, None
    for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if value is not None and not 0 < value < 1:
            raise ValueError(f"{name} must be in (0, 1), got {value}")
    if denoising_start is not None:
        if denoising_end is not None and denoising_start >= denoising_end:
            raise ValueError(
                f"denoising_start {denoising_start} must be below denoising_end {denoising_end}"
            )
        kept = int(np.sum(calls < cutoff(denoising_start)))
        if order == 2 and kept % 2 == 0:
            kept += 1
        if kept == 0 or kept > n:
            raise ValueError(
                f"denoising_start {denoising_start} leaves no steps of {num_steps}: use more steps"
            )
        begin = n - kept
        start_step = begin // order
    if denoising_end is not None:
        k = int(np.sum(calls[begin:] >= cutoff(denoising_end)))
        if k == 0:
            raise ValueError(
                f"denoising_end {denoising_end} leaves no steps of {num_steps}: use more steps"
            )
        end_step = begin + k
    return start_step, end_step


def keyword_options(name: str) -> set[str] | None:
    """The keyword options a sampler takes, or None when it forwards **options (aliases)."""
    params = inspect.signature(get_sampler(name)).parameters.values()
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
        get_sampler(sampler)  # unknown names: the registry's error lists them
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
    accepted = keyword_options(name)
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
    get_sampler(name)  # unknown names: the registry's error lists them
    accepted = keyword_options(name)
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
    accepted = keyword_options(sampler)
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
        missing = [o for o in IMG2IMG_OPTIONS if o not in keyword_options(sampler)]
        raise ValueError(
            f"img2img needs a sampler that starts from noised init latents part-way (options "
            f"{missing}); sampler {sampler!r} has no such option yet"
        )


def check_handoff_support(sampler: str):
    accepted = keyword_options(sampler)
    if accepted is not None and not all(o in accepted for o in HANDOFF_OPTIONS):
        raise ValueError(
            f"denoising_start / denoising_end need a sampler that stops and resumes part-way "
            f"(options {list(HANDOFF_OPTIONS)}); sampler {sampler!r} has none yet: use ddim, "
            "ddpm, euler, euler_ancestral, lms, heun, dpm2 or dpm2_ancestral"
        )
