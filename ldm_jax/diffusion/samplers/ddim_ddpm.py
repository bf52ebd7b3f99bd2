"""DDIM (Song et al. 2021) and ancestral DDPM (Ho et al. 2020) on VP timesteps, as diffusers'
DDIMScheduler / DDPMScheduler."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ldm_jax.diffusion.objectives import predict_x0_and_eps
from ldm_jax.diffusion.samplers import register
from ldm_jax.diffusion.schedules import NoiseSchedule, inference_timesteps


def _timestep_pairs(schedule, num_steps, timestep_spacing, steps_offset):
    """(t, t_prev, abar_t, abar_prev) as f32[num_steps] arrays; abar_prev = 1 past the end."""
    big_t = schedule.num_train_timesteps
    ts = inference_timesteps(num_steps, big_t, timestep_spacing, steps_offset)
    # diffusers' DDIM/DDPM: prev = t - T // N (for "trailing" too), and abar_prev = 1 when prev < 0
    # (DDIM's set_alpha_to_one=True; DDPM's "one" as well).
    prev = ts - big_t // num_steps
    acp = schedule.alphas_cumprod
    abar_t = acp[jnp.asarray(ts)]
    abar_prev = jnp.where(jnp.asarray(prev) >= 0, acp[jnp.clip(jnp.asarray(prev), 0)], 1.0)
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
):
    """DDIM (Song et al. 2021, Eq. 12); eta=0 is deterministic, eta=1 matches DDPM's variance."""
    ts, _, abar_t, abar_prev = _timestep_pairs(schedule, num_steps, timestep_spacing, steps_offset)
    batch = noise.shape[0]
    if rng is None:
        rng = jax.random.key(0)

    def step(i, carry):
        x, key = carry
        a, a_prev = abar_t[i], abar_prev[i]
        out = model_fn(x, jnp.full((batch,), ts[i]))
        x0, eps = predict_x0_and_eps(out, x, jnp.full((batch,), a), prediction_type)
        sigma = eta * jnp.sqrt((1 - a_prev) / (1 - a)) * jnp.sqrt(1 - a / a_prev)
        key, sub = jax.random.split(key)
        z = jax.random.normal(sub, x.shape, x.dtype)
        direction = jnp.sqrt(jnp.clip(1 - a_prev - sigma**2, 0.0)) * eps
        x = jnp.sqrt(a_prev) * x0 + direction + sigma * z
        return x, key

    x, _ = jax.lax.fori_loop(0, num_steps, step, (noise, rng))
    return x


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
):
    """Ancestral DDPM (Ho et al. 2020, Eqs. 6-7) on a subsequence of timesteps, as diffusers'
    DDPMScheduler with `variance_type="fixed_small"` and no sample clipping."""
    ts, _, abar_t, abar_prev = _timestep_pairs(schedule, num_steps, timestep_spacing, steps_offset)
    batch = noise.shape[0]

    def step(i, carry):
        x, key = carry
        a, a_prev = abar_t[i], abar_prev[i]
        out = model_fn(x, jnp.full((batch,), ts[i]))
        x0, _ = predict_x0_and_eps(out, x, jnp.full((batch,), a), prediction_type)
        alpha = a / a_prev  # the step's own alpha_t between the two kept timesteps
        beta = 1 - alpha
        # Posterior q(x_prev | x_t, x_0) mean and variance, Eq. 7.
        mean = (jnp.sqrt(a_prev) * beta / (1 - a)) * x0 + (
            jnp.sqrt(alpha) * (1 - a_prev) / (1 - a)
        ) * x
        var = jnp.clip((1 - a_prev) / (1 - a) * beta, 1e-20)
        key, sub = jax.random.split(key)
        z = jax.random.normal(sub, x.shape, x.dtype)
        last = i == num_steps - 1  # no noise is added at the final step
        x = mean + jnp.where(last, 0.0, jnp.sqrt(var)) * z
        return x, key

    x, _ = jax.lax.fori_loop(0, num_steps, step, (noise, rng))
    return x
