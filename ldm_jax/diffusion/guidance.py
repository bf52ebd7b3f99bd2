"""Classifier-free guidance (Ho & Salimans 2022): one batched call for cond and uncond."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp


def classifier_free_guidance(
    apply_fn: Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray],
    cond: jnp.ndarray,
    uncond: jnp.ndarray,
    guidance_scale: jnp.ndarray | float,
) -> Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]:
    """Wrap a conditional network into a guided `model_fn(x_t, t)`.

    apply_fn(x: f32[2B,...], t: f32[2B], context: f32[2B,L,D]) -> output (same parameterization as
    the network). cond/uncond: f32[B,L,D] text embeddings (uncond is the empty or negative prompt).
    The guided output is uncond + w (cond - uncond), diffusers' convention: w=1 is the plain
    conditional model and w=0 the unconditional one. `guidance_scale` may be a traced scalar or
    a per-example f32[B] so that changing it does not recompile.
    """
    context = jnp.concatenate([uncond, cond], axis=0)

    def model_fn(x_t, t):
        out = apply_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), context)
        out_uncond, out_cond = jnp.split(out, 2, axis=0)
        w = jnp.asarray(guidance_scale, out.dtype)
        w = jnp.reshape(w, w.shape + (1,) * (out_cond.ndim - w.ndim))
        return out_uncond + w * (out_cond - out_uncond)

    return model_fn
