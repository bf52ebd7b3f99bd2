"""Noising, training targets and the conversions between parameterizations.

For a VP schedule x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps (Ho et al. 2020, Eq. 4), the network
predicts eps, x_0 ("sample") or v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022, Sec. 4).
"""

from __future__ import annotations

import jax.numpy as jnp

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _bcast(a: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """Reshape a per-example float[B] to broadcast against x float[B, ...]."""
    return jnp.reshape(a, a.shape + (1,) * (x.ndim - a.ndim))


def alpha_bar_at(alphas_cumprod: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """abar at integer timesteps t: int[B] -> float32[B]."""
    return alphas_cumprod[t.astype(jnp.int32)]


def add_noise(x0: jnp.ndarray, noise: jnp.ndarray, alpha_bar: jnp.ndarray) -> jnp.ndarray:
    """x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps; alpha_bar: float[B]."""
    a = _bcast(alpha_bar, x0)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise


def training_target(x0, noise, alpha_bar, prediction_type: str):
    """What the network should output for (x_0, eps) at noise level abar."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        a = _bcast(alpha_bar, x0)
        return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0
    raise ValueError(
        f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}"
    )


def predict_x0_and_eps(model_output, x_t, alpha_bar, prediction_type: str):
    """Turn a network output into (x_0 estimate, eps estimate) at x_t."""
    a = _bcast(alpha_bar, x_t)
    sa, s1a = jnp.sqrt(a), jnp.sqrt(1.0 - a)
    if prediction_type == "epsilon":
        eps = model_output
        return (x_t - s1a * eps) / sa, eps
    if prediction_type == "sample":
        x0 = model_output
        return x0, (x_t - sa * x0) / s1a
    if prediction_type == "v_prediction":
        v = model_output
        return sa * x_t - s1a * v, sa * v + s1a * x_t
    raise ValueError(
        f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}"
    )


LOSS_WEIGHTINGS = ("none", "min_snr")


def loss_weight(alpha_bar, prediction_type: str, weighting: str = "none", gamma: float = 5.0):
    """Per-example weight of the MSE to the target, float32[B].

    "min_snr": Min-SNR-gamma (Hang et al. 2023, Eq. 8): the x_0-space weight min(SNR, gamma),
    expressed for the network's own target (divided by SNR for eps, by SNR + 1 for v). It caps the
    weight of the low-noise steps, which otherwise dominate and slow convergence.
    """
    if weighting == "none":
        return jnp.ones_like(alpha_bar)
    if weighting != "min_snr":
        raise ValueError(
            f"unknown loss weighting {weighting!r}; valid: {', '.join(LOSS_WEIGHTINGS)}"
        )
    snr = alpha_bar / (1.0 - alpha_bar)
    clipped = jnp.minimum(snr, gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    if prediction_type == "sample":
        return clipped
    raise ValueError(
        f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}"
    )


def weighted_mse(pred, target, alpha_bar, prediction_type: str, weighting="none", gamma=5.0):
    """(loss, {"mse"}): the per-example mean squared error of the network's output to its target
    (in float32 whatever the compute dtype), weighted by `loss_weight` and averaged over the
    batch; "mse" is the unweighted mean, for logs."""
    mse = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=tuple(range(1, pred.ndim)))
    weight = loss_weight(alpha_bar, prediction_type, weighting, gamma)
    return jnp.mean(weight * mse), {"mse": jnp.mean(mse)}


def denoising_loss(
    apply_fn, x0, noise, t, alphas_cumprod, prediction_type: str, weighting="none", gamma=5.0
):
    """The denoising objective (Ho et al. 2020, Eq. 14; in any parameterization, Salimans & Ho
    2022, and weighting, Hang et al. 2023): x_0 noised to integer timesteps t (int[B]) with
    `noise`, the network's output at (x_t, t as float32) against its target.

    apply_fn(x_t, t) -> output: the network with its conditioning bound (text, micro-
    conditioning, dropout rng). The one loss of training from scratch (`train/objectives/ldm.py`) and
    fine-tuning (`train/objectives/finetune.py`); progressive distillation regresses its own target with
    `weighted_mse`. Returns (loss, {"mse"})."""
    alpha_bar = alphas_cumprod[t]
    pred = apply_fn(add_noise(x0, noise, alpha_bar), t.astype(jnp.float32))
    target = training_target(x0, noise, alpha_bar, prediction_type)
    return weighted_mse(pred, target, alpha_bar, prediction_type, weighting, gamma)
