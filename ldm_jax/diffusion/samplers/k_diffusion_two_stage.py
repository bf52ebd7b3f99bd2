"""The two-stage sigma-space samplers (k-diffusion; diffusers' schedulers of the same names):
Heun (Karras et al. 2022, Algorithm 1), DPM2 and ancestral DPM2 (k-diffusion's `sample_dpm_2`,
the DPM-Solver-2 step of Lu et al. 2022 in sigma space). Each runs diffusers' interleaved
timesteps (first stage, second stage, ...), one network call per loop iteration, so the compiled
loop holds a single copy of the network. Conventions: `k_diffusion.py`.
"""

from __future__ import annotations

import numpy as np

from ldm_jax.diffusion.samplers import check_handoff, register
from ldm_jax.diffusion.samplers.k_diffusion import (
    _check,
    _interleave,
    _need_rng,
    _start,
    _two_stage,
)
from ldm_jax.diffusion.schedules import (
    NoiseSchedule,
    inference_sigmas,
    k_alphas_cumprod,
    sigma_to_t,
)


@register("heun")
def heun(
    model_fn,
    noise,
    schedule: NoiseSchedule,
    num_steps: int,
    rng=None,
    *,
    prediction_type: str = "epsilon",
    timestep_spacing: str = "linspace",
    steps_offset: int = 0,
    use_karras_sigmas: bool = False,
    use_exponential_sigmas: bool = False,
    use_beta_sigmas: bool = False,
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    start_step: int = 0,
    init_latents=None,
    end_step: int | None = None,
    add_noise: bool = True,
):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1), as diffusers'
    HeunDiscreteScheduler: an Euler step to sigma_{i+1}, corrected with the mean of the two
    derivatives; the last step (to sigma = 0) is plain Euler. 2N - 1 network calls."""
    _check(prediction_type)
    ts, sigmas = inference_sigmas(
        schedule,
        num_steps,
        timestep_spacing=timestep_spacing,
        steps_offset=steps_offset,
        use_karras_sigmas=use_karras_sigmas,
        use_exponential_sigmas=use_exponential_sigmas,
        use_beta_sigmas=use_beta_sigmas,
    )
    s = sigmas.astype(np.float64)
    n = num_steps
    calls = dict(
        t=_interleave(ts, ts[1:]),
        sigma=_interleave(s[:-1], s[1:n]),  # the second stage evaluates at sigma_{i+1}
        first=_interleave(np.ones(n), np.zeros(n - 1)),
        dt=_interleave(s[1:] - s[:-1], s[1:n] - s[: n - 1]),
        w=_interleave(np.zeros(n), np.full(n - 1, 0.5)),
        up=np.zeros(2 * n - 1),
    )
    check_handoff(2 * num_steps - 1, 2 * start_step, end_step, add_noise, init_latents)
    x = _start(noise, sigmas, num_steps, timestep_spacing, start_step, init_latents, add_noise)
    clip = clip_sample_range if clip_sample else None
    return _two_stage(
        model_fn,
        x,
        calls,
        prediction_type,
        clip_range=clip,
        start_step=start_step,
        end_step=end_step,
    )


def _dpm2_sigmas(schedule, num_steps, timestep_spacing, steps_offset, **sigma_options):
    return inference_sigmas(
        schedule,
        num_steps,
        timestep_spacing=timestep_spacing,
        steps_offset=steps_offset,
        round_karras_timesteps=True,  # KDPM2*DiscreteScheduler.set_timesteps rounds them
        **sigma_options,
    )


@register("dpm2")
def dpm2(
    model_fn,
    noise,
    schedule: NoiseSchedule,
    num_steps: int,
    rng=None,
    *,
    prediction_type: str = "epsilon",
    timestep_spacing: str = "linspace",
    steps_offset: int = 0,
    use_karras_sigmas: bool = False,
    use_exponential_sigmas: bool = False,
    use_beta_sigmas: bool = False,
    start_step: int = 0,
    init_latents=None,
    end_step: int | None = None,
    add_noise: bool = True,
):
    """DPM-Solver-2 in sigma (Lu et al. 2022, Algorithm 1 with r = 1/2; k-diffusion
    `sample_dpm_2`), as diffusers' KDPM2DiscreteScheduler: an Euler step to the log-midpoint
    sqrt(sigma_i sigma_{i+1}), whose derivative then makes the whole step; the last step to
    sigma = 0 is plain Euler. 2N - 1 network calls."""
    _check(prediction_type)
    ts, sigmas = _dpm2_sigmas(
        schedule,
        num_steps,
        timestep_spacing,
        steps_offset,
        use_karras_sigmas=use_karras_sigmas,
        use_exponential_sigmas=use_exponential_sigmas,
        use_beta_sigmas=use_beta_sigmas,
    )
    s = sigmas.astype(np.float64)
    n = num_steps
    mid = np.sqrt(s[:-1] * s[1:])  # exp(lerp(log sigma_i, log sigma_{i+1}, 1/2)); 0 at the end
    t_mid = sigma_to_t(mid[: n - 1], k_alphas_cumprod(schedule))
    calls = dict(
        t=_interleave(ts, t_mid),
        sigma=_interleave(s[:-1], mid[: n - 1]),
        first=_interleave(np.ones(n), np.zeros(n - 1)),
        dt=_interleave(mid - s[:-1], s[1:n] - s[: n - 1]),
        w=np.zeros(2 * n - 1),
        up=np.zeros(2 * n - 1),
    )
    check_handoff(2 * num_steps - 1, 2 * start_step, end_step, add_noise, init_latents)
    x = _start(noise, sigmas, num_steps, timestep_spacing, start_step, init_latents, add_noise)
    return _two_stage(model_fn, x, calls, prediction_type, start_step=start_step, end_step=end_step)


@register("dpm2_ancestral")
def dpm2_ancestral(
    model_fn,
    noise,
    schedule: NoiseSchedule,
    num_steps: int,
    rng=None,
    *,
    prediction_type: str = "epsilon",
    timestep_spacing: str = "linspace",
    steps_offset: int = 0,
    use_karras_sigmas: bool = False,
    use_exponential_sigmas: bool = False,
    use_beta_sigmas: bool = False,
    start_step: int = 0,
    init_latents=None,
    end_step: int | None = None,
    add_noise: bool = True,
):
    """Ancestral DPM-Solver-2 (k-diffusion `sample_dpm_2_ancestral`), as diffusers'
    KDPM2AncestralDiscreteScheduler: a DPM2 step to sigma_down through the log-midpoint of sigma_i
    and sigma_down, then noise of std sigma_up (as in ancestral Euler). The noise of step i is
    drawn at its second call, 2i + 1. 2N - 1 network calls."""
    _check(prediction_type)
    _need_rng(rng, "dpm2_ancestral")
    ts, sigmas = _dpm2_sigmas(
        schedule,
        num_steps,
        timestep_spacing,
        steps_offset,
        use_karras_sigmas=use_karras_sigmas,
        use_exponential_sigmas=use_exponential_sigmas,
        use_beta_sigmas=use_beta_sigmas,
    )
    s = sigmas.astype(np.float64)
    n = num_steps
    up = np.sqrt(s[1:] ** 2 * (s[:-1] ** 2 - s[1:] ** 2) / s[:-1] ** 2)
    down = np.sqrt(s[1:] ** 2 - up**2)
    mid = np.sqrt(s[:-1] * down)
    mid[n - 1 :] = 0.0  # diffusers zeroes the last interpolated sigma: the last step is Euler
    t_mid = sigma_to_t(mid[: n - 1], k_alphas_cumprod(schedule))
    calls = dict(
        t=_interleave(ts, t_mid),
        sigma=_interleave(s[:-1], mid[: n - 1]),
        first=_interleave(np.ones(n), np.zeros(n - 1)),
        dt=_interleave(mid - s[:-1], down[: n - 1] - s[: n - 1]),
        w=np.zeros(2 * n - 1),
        up=_interleave(np.zeros(n), up[: n - 1]),
    )
    check_handoff(2 * num_steps - 1, 2 * start_step, end_step, add_noise, init_latents)
    x = _start(noise, sigmas, num_steps, timestep_spacing, start_step, init_latents, add_noise)
    return _two_stage(
        model_fn, x, calls, prediction_type, rng=rng, start_step=start_step, end_step=end_step
    )
