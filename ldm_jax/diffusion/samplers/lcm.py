"""LCM multistep sampling (Luo et al. 2023, "Latent Consistency Models", Algorithm 3), as
diffusers' LCMScheduler.

Each step evaluates the consistency function f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t)
(Song et al. 2023, Eq. 7; LCM's boundary-condition scalings with sigma_data = 0.5 and timesteps
scaled by `timestep_scaling`), then re-noises it to the next timestep with fresh noise. The
timesteps are a subset of the `original_inference_steps` skipping schedule LCM was distilled on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.objectives import PREDICTION_TYPES, predict_x0_and_eps
from ldm_jax.diffusion.samplers import initial_sample, normal_like, register
from ldm_jax.diffusion.schedules import NoiseSchedule, concrete_alphas_cumprod


def lcm_timesteps(num_steps: int, num_train_timesteps: int = 1000, original_inference_steps=50):
    """int64[N] decreasing: LCMScheduler.set_timesteps (strength 1): N of the
    `original_inference_steps` timesteps k - 1, 2k - 1, ..., T - 1 (k = T // original), evenly
    picked by index from the top; e.g. 4 steps of 50 give 999, 759, 499, 259."""
    big_t, orig = num_train_timesteps, original_inference_steps
    if orig > big_t:
        raise ValueError(f"original_inference_steps {orig} > num_train_timesteps {big_t}")
    if not 1 <= num_steps <= orig:
        raise ValueError(
            f"lcm num_steps must be in [1, original_inference_steps={orig}], got {num_steps}"
        )
    origin = (np.arange(1, orig + 1) * (big_t // orig) - 1)[::-1]
    idx = np.floor(np.linspace(0, orig, num=num_steps, endpoint=False)).astype(np.int64)
    return origin[idx]


def _threshold(x0, ratio, max_value):
    """Dynamic thresholding (Saharia et al. 2022, Sec. 2.3; diffusers `_threshold_sample`): per
    example, clip to the `ratio` quantile s of |x0| (s in [1, max_value]) and divide by s."""
    flat = x0.reshape(x0.shape[0], -1)
    s = jnp.clip(jnp.quantile(jnp.abs(flat), ratio, axis=1), 1.0, max_value)[:, None]
    return (jnp.clip(flat, -s, s) / s).reshape(x0.shape)


@register("lcm")
def lcm(
    model_fn,
    noise,
    schedule: NoiseSchedule,
    num_steps: int,
    rng=None,
    *,
    prediction_type: str = "epsilon",
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
    original_inference_steps: int = 50,
    timestep_scaling: float = 10.0,
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    set_alpha_to_one: bool = True,
    start_step: int = 0,
    init_latents=None,
):
    """LCM multistep sampling; the noise of step i (all but the last) is normal(fold_in(rng, i)).

    timestep_spacing, steps_offset and set_alpha_to_one are accepted for the shared interface and
    scheduler configs but, as in diffusers' LCMScheduler, do not change anything (the timesteps
    come from `original_inference_steps`, and the previous timestep is never negative)."""
    del timestep_spacing, steps_offset, set_alpha_to_one
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}"
        )
    acp = concrete_alphas_cumprod(schedule)
    ts = lcm_timesteps(num_steps, len(acp), original_inference_steps)
    if num_steps > 1 and rng is None:
        raise ValueError("sampler 'lcm' draws noise between steps: pass a PRNG key as rng")
    prev = np.append(ts[1:], ts[-1])  # the last step's "previous" timestep is itself
    # Boundary-condition scalings (LCM, Sec. 4.1 / Consistency Models, Eq. 7), sigma_data = 0.5.
    scaled = ts * timestep_scaling
    c_skip = 0.25 / (scaled**2 + 0.25)
    c_out = scaled / np.sqrt(scaled**2 + 0.25)
    consts = [jnp.asarray(a, jnp.float32) for a in (ts, acp[ts], acp[prev], c_skip, c_out)]
    t_c, a_t, a_prev, c_skip, c_out = consts
    batch = noise.shape[0]

    def step(i, x):
        out = model_fn(x, jnp.full((batch,), t_c[i]))
        x0, _ = predict_x0_and_eps(out, x, jnp.full((batch,), a_t[i]), prediction_type)
        if thresholding:
            x0 = _threshold(x0, dynamic_thresholding_ratio, sample_max_value)
        elif clip_sample:
            x0 = jnp.clip(x0, -clip_sample_range, clip_sample_range)
        denoised = c_out[i] * x0 + c_skip[i] * x
        z = normal_like(jax.random.fold_in(rng, i), x) if rng is not None else 0
        renoised = jnp.sqrt(a_prev[i]) * denoised + jnp.sqrt(1 - a_prev[i]) * z
        return jnp.where(i == num_steps - 1, denoised, renoised)

    # init_noise_sigma = 1; img2img: add_noise at the first kept timestep.
    level = lambda k: (jnp.sqrt(a_t[k]), jnp.sqrt(1 - a_t[k]))
    x = initial_sample(noise, num_steps, start_step, init_latents, level)
    return jax.lax.fori_loop(start_step, num_steps, step, x)
