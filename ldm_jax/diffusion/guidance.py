"""Classifier-free guidance (Ho & Salimans 2022): one batched call for cond and uncond, with
guidance rescale (Lin et al. 2024) and guidance limited to an interval of noise levels
(Kynkaanniemi et al. 2024)."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from ldm_jax.diffusion.schedules import NoiseSchedule, t_to_sigma


def _per_example(value, like: jnp.ndarray) -> jnp.ndarray:
    """A scalar or f32[B] as f32[B, 1, ...] broadcasting against `like` f32[B, ...]."""
    v = jnp.asarray(value, like.dtype)
    return jnp.reshape(v, v.shape + (1,) * (like.ndim - v.ndim))


def rescale_guided(guided: jnp.ndarray, cond: jnp.ndarray, guidance_rescale) -> jnp.ndarray:
    """Rescale the guided output to the per-example std of the conditional one, blended by
    `guidance_rescale` (Lin et al. 2024, Sec. 3.4, Eqs. 15-16; diffusers' `rescale_noise_cfg`,
    which uses the unbiased std over all non-batch dimensions). It counters the over-exposure
    that large guidance scales cause with zero-terminal-SNR schedules."""
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond, axis=axes, keepdims=True, ddof=1)
    std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    phi = _per_example(guidance_rescale, guided)
    return phi * guided * (std_cond / std_guided) + (1 - phi) * guided


def classifier_free_guidance(
    apply_fn: Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray],
    cond: jnp.ndarray,
    uncond: jnp.ndarray,
    guidance_scale: jnp.ndarray | float,
    *,
    guidance_rescale: jnp.ndarray | float = 0.0,
    guidance_interval: tuple[float, float] | None = None,
    schedule: NoiseSchedule | None = None,
) -> Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]:
    """Wrap a conditional network into a guided `model_fn(x_t, t)`.

    apply_fn(x: f32[2B,...], t: f32[2B], context: f32[2B,L,D]) -> output (same parameterization as
    the network). cond/uncond: f32[B,L,D] text embeddings (uncond is the empty or negative prompt).
    The guided output is uncond + w (cond - uncond), diffusers' convention: w=1 is the plain
    conditional model and w=0 the unconditional one. `guidance_scale` and `guidance_rescale` may be
    traced scalars or per-example f32[B], so changing them does not recompile.

    guidance_interval=(sigma_lo, sigma_hi): guide only where sigma_lo < sigma(t) <= sigma_hi and use
    the conditional output (w=1) elsewhere (Kynkaanniemi et al. 2024, Eq. 2; sigma in the
    k-diffusion scale sqrt((1 - abar) / abar)); needs the `schedule` to map t to sigma.
    """
    if guidance_interval is not None:
        if schedule is None:
            raise ValueError("guidance_interval needs the noise schedule (schedule=...)")
        sigma_lo, sigma_hi = guidance_interval
        if not 0 <= sigma_lo < sigma_hi:
            raise ValueError(
                f"guidance_interval must be (lo, hi) with 0 <= lo < hi, got {guidance_interval}"
            )
    context = jnp.concatenate([uncond, cond], axis=0)

    def model_fn(x_t, t):
        out = apply_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), context)
        out_uncond, out_cond = jnp.split(out, 2, axis=0)
        w = jnp.broadcast_to(jnp.asarray(guidance_scale, out.dtype), t.shape)
        if guidance_interval is not None:
            sigma = t_to_sigma(t, schedule)
            w = jnp.where((sigma > sigma_lo) & (sigma <= sigma_hi), w, 1.0)
        guided = out_uncond + _per_example(w, out_cond) * (out_cond - out_uncond)
        if isinstance(guidance_rescale, int | float) and guidance_rescale == 0:
            return guided  # the common case: skip two reductions per step
        return rescale_guided(guided, out_cond, guidance_rescale)

    return model_fn
