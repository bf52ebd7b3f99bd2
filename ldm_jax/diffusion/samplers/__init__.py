"""Samplers: one signature, a registry by name, the whole loop inside `lax.fori_loop`.

Every sampler is `sampler(model_fn, noise, schedule, num_steps, rng, **options) -> x_0` where
- model_fn(x_t: f32[B,...], t: f32[B]) -> network output in `prediction_type` (x_t in the VP
  scaling the network was trained on, t in training-timestep units, fractional where a
  sigma-space sampler needs it);
- noise: standard-normal f32[B,...] initial noise (each sampler scales it as its algorithm needs);
- schedule: a `NoiseSchedule`; num_steps: static int; rng: PRNG key (used by stochastic ones);
- options: keyword-only, in diffusers' vocabulary (`prediction_type`, `timestep_spacing`,
  `steps_offset`, `use_karras_sigmas`, ...); the VP solvers (DPM-Solver, UniPC, DEIS) also take
  `sigmas`, an explicit schedule (e.g. an optimized one, see experiments/sampler_benchmark);
- img2img options, taken by every sampler: `start_step` (skip the first k of the num_steps steps,
  diffusers' `strength` truncation `timesteps[k * order:]`) and `init_latents` (f32[B,...] clean
  latents, noised to the first kept step's level as diffusers' `scheduler.add_noise` does; the
  solver's history and warm-up start afresh there). See `initial_sample`.
- ensemble-of-experts handoff options (SDXL base -> refiner), taken by DDIM, DDPM, Euler (and
  ancestral), LMS, Heun and DPM2 (and ancestral), not yet by the others: `end_step` (stop after the
  first k entries of diffusers' timesteps list, `timesteps[:k]`, and return the partly denoised
  latents: the base's `denoising_end`; for the two-stage samplers Heun and DPM2 an entry is a
  network call) and `add_noise=False` (start from `init_latents` as they are, already at the
  first kept step's level: the refiner's `denoising_start`). See `check_handoff`.
Timesteps and sigmas are computed on the host from the static `num_steps`, so changing the seed,
prompts or guidance scale reuses the compiled loop.

Families live in their own modules: `ddim_ddpm` (DDIM, DDPM), `k_diffusion` (sigma-space samplers of
Karras et al. 2022 / k-diffusion: Euler, LMS, ancestral Euler, DPM-Solver++ SDE) and
`k_diffusion_two_stage` (Heun, DPM2, ancestral DPM2), `pndm`, `lcm`,
`dpm_solver` (DPM-Solver / DPM-Solver++ single- and multistep, SDE variants), `unipc`, `deis`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from ldm_jax import rng

SAMPLERS: dict[str, Callable] = {}


def register(name: str):
    """Decorator: add a sampler to the registry under `name`."""

    def wrap(fn):
        if name in SAMPLERS:
            raise ValueError(f"sampler {name!r} registered twice")
        SAMPLERS[name] = fn
        return fn

    return wrap


def get_sampler(name: str) -> Callable:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name]


def sampler_names() -> list[str]:
    return sorted(SAMPLERS)


def network_evaluations(sampler: str, num_steps: int) -> int | None:
    """Network calls (NFE) of `num_steps` steps of `sampler`, None where that is not runnable;
    with classifier-free guidance a call is one batched cond + uncond evaluation. From each
    algorithm: Heun, DPM2 and DPM-Solver++ SDE evaluate twice per step but once in the last step
    (to sigma = 0, an Euler step); PNDM's first three steps are pseudo Runge-Kutta steps of 4
    calls each (N + 9 calls, N >= 4); PLMS makes one extra call for its first step's 2nd-order
    correction. experiments/sampler_benchmark counts the calls and checks them against this."""
    get_sampler(sampler)
    if sampler in ("heun", "dpm2", "dpm2_ancestral", "dpmpp_sde"):
        return 2 * num_steps - 1
    if sampler == "pndm":
        return num_steps + 9 if num_steps >= 4 else None
    if sampler == "plms":
        return num_steps + 1
    if sampler == "lcm" and num_steps > 50:  # a subset of the 50 original_inference_steps
        return None
    return num_steps


def normal_like(key, x: jnp.ndarray) -> jnp.ndarray:
    """Standard-normal noise of x's shape and dtype (`ldm_jax.rng.normal`: the values of
    `jax.random.normal`, compiled faster on CPU)."""
    return rng.normal(key, x.shape, x.dtype)


def check_img2img(noise, num_steps: int, start_step, init_latents) -> None:
    """ValueError naming what is wrong with the img2img options (start_step: a static int in
    [0, num_steps); init_latents: None, or an array of the noise's shape, needed when
    start_step > 0)."""
    if isinstance(start_step, bool) or not isinstance(start_step, int | np.integer):
        raise ValueError(f"start_step must be an int, got {start_step!r}")
    if not 0 <= start_step < num_steps:
        raise ValueError(f"start_step must be in [0, num_steps={num_steps}), got {start_step}")
    if init_latents is None and start_step:
        raise ValueError("start_step > 0 needs init_latents (the clean latents to noise)")
    if init_latents is not None and jnp.shape(init_latents) != jnp.shape(noise):
        raise ValueError(
            f"init_latents must have the noise's shape {jnp.shape(noise)}, "
            f"got {jnp.shape(init_latents)}"
        )


def check_handoff(loop_length: int, start: int, end_step, add_noise: bool, init_latents) -> int:
    """The loop's end (`end_step`, or `loop_length` when None), after checking the handoff
    options: end_step in (start, loop_length]; add_noise=False needs init_latents."""
    if not add_noise and init_latents is None:
        raise ValueError("add_noise=False needs init_latents (the latents to continue from)")
    if end_step is None:
        return loop_length
    if isinstance(end_step, bool) or not isinstance(end_step, int | np.integer):
        raise ValueError(f"end_step must be an int, got {end_step!r}")
    if not start < end_step <= loop_length:
        raise ValueError(f"end_step must be in ({start}, {loop_length}], got {end_step}")
    return int(end_step)


def initial_sample(
    noise: jnp.ndarray,
    num_steps: int,
    start_step: int,
    init_latents,
    level: Callable[[int], tuple],
    txt2img_scale=1.0,
    add_noise: bool = True,
) -> jnp.ndarray:
    """The sample a loop starts from, after checking the img2img options.

    Text-to-image (no init_latents): noise * txt2img_scale (diffusers' `init_noise_sigma`).
    img2img: alpha * init_latents + sigma * noise with (alpha, sigma) = level(start_step), the
    forward process at the first kept step (Meng et al. 2022, SDEdit; diffusers' `add_noise`):
    (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) for the VP samplers, (1, sigma_k) for the
    sigma-space ones. Also with start_step = 0: diffusers' img2img noises the image at strength 1.
    add_noise=False: init_latents as they are (a handoff: they are already at that level).
    """
    check_img2img(noise, num_steps, start_step, init_latents)
    if init_latents is None:
        return noise * txt2img_scale
    if not add_noise:
        return jnp.asarray(init_latents, noise.dtype)
    alpha, sigma = level(int(start_step))
    return alpha * jnp.asarray(init_latents, noise.dtype) + sigma * noise


# Importing the family modules fills the registry (they import `register` from here).
from ldm_jax.diffusion.samplers import (  # noqa: E402
    deis,  # noqa: F401
    dpm_solver,  # noqa: F401
    k_diffusion,  # noqa: F401
    k_diffusion_two_stage,  # noqa: F401
    lcm,  # noqa: F401
    pndm,  # noqa: F401
    unipc,  # noqa: F401
)
from ldm_jax.diffusion.samplers.ddim_ddpm import ddim, ddpm  # noqa: E402

__all__ = [
    "SAMPLERS",
    "ddim",
    "ddpm",
    "check_img2img",
    "get_sampler",
    "initial_sample",
    "network_evaluations",
    "normal_like",
    "register",
    "sampler_names",
]
