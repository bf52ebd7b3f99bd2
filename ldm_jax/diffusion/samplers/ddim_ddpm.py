"""DDIM (Song et al. 2021) and ancestral DDPM (Ho et al. 2020) on VP timesteps, as diffusers'
DDIMScheduler / DDPMScheduler."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ldm_jax.diffusion.objectives import predict_x0_and_eps
from ldm_jax.diffusion.samplers import check_handoff, initial_sample, normal_like, register
from ldm_jax.diffusion.schedules import NoiseSchedule, inference_timesteps


def _timestep_pairs(schedule, num_steps, timestep_spacing, steps_offset, set_alpha_to_one=True):
    """(t, t_prev, abar_t, abar_prev) as f32[num_steps] arrays; past the end abar_prev is 1
    (`set_alpha_to_one`) or abar_0 (SD 2.x's DDIM config)."""
    big_t = schedule.num_train_timesteps
    ts = inference_timesteps(num_steps, big_t, timestep_spacing, steps_offset)
    # diffusers' DDIM/DDPM: prev = t - T // N (for "trailing" too), and abar_prev = 1 when prev < 0
    # (DDIM's set_alpha_to_one=True; DDPM's "one" as well), else abar_0.
    prev = ts - big_t // num_steps
    acp = schedule.alphas_cumprod
    abar_t = acp[jnp.asarray(ts)]
    final = 1.0 if set_alpha_to_one else acp[0]
    abar_prev = jnp.where(jnp.asarray(prev) >= 0, acp[jnp.clip(jnp.asarray(prev), 0)], final)
    return jnp.asarray(ts, jnp.float32), jnp.asarray(prev), abar_t, abar_prev


@register("ddim")
def ddim(
    model_fn,
    noise,
    schedule: NoiseSchedule,
    num_steps: int,
    rng=None,
    *,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
    set_alpha_to_one: bool = True,
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    start_step: int = 0,
    init_latents=None,
    end_step: int | None = None,
    add_noise: bool = True,
):
    """DDIM (Song et al. 2021, Eq. 12); eta=0 is deterministic, eta=1 matches DDPM's variance.

    `clip_sample` clamps the x_0 estimate to +-clip_sample_range (pixel-space models; diffusers'
    class default is True, its SD configs set False) and keeps the eps estimate unclipped, as
    diffusers' DDIMScheduler does without `use_clipped_model_output`."""
    ts, _, abar_t, abar_prev = _timestep_pairs(
        schedule, num_steps, timestep_spacing, steps_offset, set_alpha_to_one
    )
    batch = noise.shape[0]
    if rng is None:
        rng = jax.random.key(0)
    # eta = 0 given as a number: draw no noise at all (it would be multiplied by 0).
    deterministic = isinstance(eta, (int, float)) and eta == 0

    def step(i, carry):
        x, key = carry
        a, a_prev = abar_t[i], abar_prev[i]
        out = model_fn(x, jnp.full((batch,), ts[i]))
        x0, eps = predict_x0_and_eps(out, x, jnp.full((batch,), a), prediction_type)
        if clip_sample:
            x0 = jnp.clip(x0, -clip_sample_range, clip_sample_range)
        sigma = eta * jnp.sqrt((1 - a_prev) / (1 - a)) * jnp.sqrt(1 - a / a_prev)
        key, sub = jax.random.split(key)
        direction = jnp.sqrt(jnp.clip(1 - a_prev - sigma**2, 0.0)) * eps
        x_prev = jnp.sqrt(a_prev) * x0 + direction
        if not deterministic:
            x_prev = x_prev + sigma * normal_like(sub, x)
        return x_prev, key

    end = check_handoff(num_steps, start_step, end_step, add_noise, init_latents)
    x = _start(noise, num_steps, start_step, init_latents, abar_t, add_noise)
    x, _ = jax.lax.fori_loop(start_step, end, step, (x, rng))
    return x


def _start(noise, num_steps, start_step, init_latents, abar_t, add_noise=True):
    """img2img: the init latents noised at the first kept timestep (diffusers' add_noise)."""
    level = lambda k: (jnp.sqrt(abar_t[k]), jnp.sqrt(1 - abar_t[k]))
    return initial_sample(noise, num_steps, start_step, init_latents, level, add_noise=add_noise)


@register("ddpm")
def ddpm(
    model_fn,
    noise,
    schedule: NoiseSchedule,
    num_steps: int,
    rng,
    *,
    prediction_type: str = "epsilon",
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    start_step: int = 0,
    init_latents=None,
    end_step: int | None = None,
    add_noise: bool = True,
):
    """Ancestral DDPM (Ho et al. 2020, Eqs. 6-7) on a subsequence of timesteps, as diffusers'
    DDPMScheduler with `variance_type="fixed_small"`; `clip_sample` clamps the x_0 estimate."""
    ts, _, abar_t, abar_prev = _timestep_pairs(schedule, num_steps, timestep_spacing, steps_offset)
    batch = noise.shape[0]

    def step(i, carry):
        x, key = carry
        a, a_prev = abar_t[i], abar_prev[i]
        out = model_fn(x, jnp.full((batch,), ts[i]))
        x0, _ = predict_x0_and_eps(out, x, jnp.full((batch,), a), prediction_type)
        if clip_sample:
            x0 = jnp.clip(x0, -clip_sample_range, clip_sample_range)
        alpha = a / a_prev  # the step's own alpha_t between the two kept timesteps
        beta = 1 - alpha
        # Posterior q(x_prev | x_t, x_0) mean and variance, Eq. 7.
        mean = (jnp.sqrt(a_prev) * beta / (1 - a)) * x0 + (
            jnp.sqrt(alpha) * (1 - a_prev) / (1 - a)
        ) * x
        var = jnp.clip((1 - a_prev) / (1 - a) * beta, 1e-20)
        key, sub = jax.random.split(key)
        z = normal_like(sub, x)
        last = i == num_steps - 1  # no noise is added at the final step
        x = mean + jnp.where(last, 0.0, jnp.sqrt(var)) * z
        return x, key

    end = check_handoff(num_steps, start_step, end_step, add_noise, init_latents)
    x = _start(noise, num_steps, start_step, init_latents, abar_t, add_noise)
    x, _ = jax.lax.fori_loop(start_step, end, step, (x, rng))
    return x
