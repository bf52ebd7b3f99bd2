"""Plumbing shared by the VP-space multistep solvers: DPM-Solver(++), UniPC and DEIS.

diffusers' DPMSolverMultistep/Singlestep, UniPCMultistep and DEISMultistep schedulers share one way
of choosing timesteps and sigmas, one parameterization (alpha_t = 1 / sqrt(1 + sigma^2),
sigma_t = sigma alpha_t, lambda = log alpha_t - log sigma_t; Lu et al. 2022a, Sec. 3.1) and one
shape of update: every step is a linear combination of a sample, the last K converted model outputs
and (SDE variants) fresh noise. So each solver here builds a `Plan` -- the per-step coefficients,
computed on the host in float64 from the static number of steps -- and `run_plan` executes it in
one `lax.fori_loop` that carries the output history in a fixed-size buffer.

The host code mirrors diffusers' float32 choices where they decide a discrete outcome (which integer
timestep a Karras sigma is rounded or truncated to), so that the same model sees the same inputs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.objectives import PREDICTION_TYPES
from ldm_jax.diffusion.samplers import initial_sample, normal_like
from ldm_jax.diffusion.schedules import (
    TIMESTEP_SPACINGS,
    NoiseSchedule,
    exponential_sigmas,
    karras_sigmas,
)

SIGMA_SCHEDULES = ("karras", "exponential", "beta", "lu")

# --- Timesteps and sigmas (host, numpy) --------------------------------------------------------


def alphas_cumprod32(schedule: NoiseSchedule) -> np.ndarray:
    """float32[T] alphas_cumprod; a zero terminal value (rescaled to zero SNR, Lin et al. 2024)
    becomes 2**-24, as diffusers' DPM-Solver and UniPC schedulers do, so sigma stays finite."""
    acp = np.array(schedule.alphas_cumprod, np.float32)
    if acp[-1] == 0.0:
        acp[-1] = 2.0**-24
    return acp


def train_sigmas(acp: np.ndarray) -> np.ndarray:
    """float32[T] sigma of each training timestep, computed in float32 as diffusers does."""
    return ((1 - acp) / acp) ** np.float32(0.5)


def last_timestep(acp: np.ndarray, lambda_min_clipped: float) -> int:
    """diffusers' DPM-Solver `lambda_min_clipped`: drop the noisiest timesteps whose
    lambda = log alpha - log sigma lies below the threshold (needed for the cosine schedule)."""
    lam = np.log(np.sqrt(acp)) - np.log(np.sqrt(1 - acp))
    return len(acp) - int(np.searchsorted(lam[::-1], lambda_min_clipped, side="left"))


def spaced_timesteps(
    num_steps: int, num_train: int, spacing: str, steps_offset: int, last: int | None = None
) -> np.ndarray:
    """int64[num_steps] decreasing timesteps, as DPMSolverMultistep / UniPC / DEIS `set_timesteps`:
    num_steps + 1 points of which the last (t = 0) is dropped -- unlike DDIM's spacing."""
    n, last = num_steps, num_train if last is None else last
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        ratio = num_train / n
        return np.arange(last, 0, -ratio).round().astype(np.int64) - 1
    raise ValueError(f"unknown timestep_spacing {spacing!r}; valid: {', '.join(TIMESTEP_SPACINGS)}")


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """diffusers' `_sigma_to_t` with its float32 `log_sigmas`: the truncation of non-rounded
    timesteps (exponential/beta sigmas) depends on that float32 rounding at the end points."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def timesteps_and_sigmas(
    acp: np.ndarray,
    num_steps: int,
    *,
    timestep_spacing: str,
    steps_offset: int,
    last: int | None = None,
    sigma_schedule: str | None = None,
    round_timesteps: bool = True,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    custom_sigmas=None,
) -> tuple[np.ndarray, np.ndarray]:
    """(int64[N] model timesteps, float64[N] solver sigmas), before the final sigma is appended.

    Without `sigma_schedule` the sigmas are the training sigmas at the spaced timesteps. With one,
    the sigmas are Karras et al. 2022 (Eq. 5, rho 7) / exponential / beta (Lee et al. 2024, a=b=0.6)
    / uniform-in-log-sigma ("lu": Lu et al. 2022b) between the training extremes, and the model is
    called at `_sigma_to_t` of each, rounded (`round_timesteps`) or else truncated to an integer --
    diffusers' int64 cast -- so the model's noise level differs slightly from the solver's sigma.
    `custom_sigmas` (the samplers' `sigmas` option): an explicit decreasing schedule of N sigmas
    within the training range; the model is then called at their exact fractional timesteps
    (float64), so it sees the solver's own noise levels.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sig = train_sigmas(acp)
    if custom_sigmas is not None:
        if sigma_schedule is not None:
            raise ValueError(f"give either sigmas or a {sigma_schedule} sigma schedule, not both")
        return custom_sigma_schedule(sig, num_steps, custom_sigmas)
    ts = spaced_timesteps(num_steps, len(acp), timestep_spacing, steps_offset, last)
    if sigma_schedule is None:
        return ts, np.interp(ts, np.arange(len(sig)), sig)
    log_sig = np.log(sig)
    lo = float(sig[0]) if sigma_min is None else sigma_min
    hi = float(sig[-1]) if sigma_max is None else sigma_max
    if sigma_schedule == "karras":
        sigmas = karras_sigmas(num_steps, lo, hi)
    elif sigma_schedule == "exponential":
        sigmas = exponential_sigmas(num_steps, lo, hi)
    elif sigma_schedule == "beta":
        import scipy.stats  # host-side only, as in diffusers

        ppf = scipy.stats.beta.ppf(1 - np.linspace(0, 1, num_steps), 0.6, 0.6)
        sigmas = lo + ppf * (hi - lo)
    elif sigma_schedule == "lu":
        sigmas = np.exp(np.linspace(float(log_sig[-1]), float(log_sig[0]), num_steps))
    else:
        raise ValueError(f"unknown sigma schedule {sigma_schedule!r}")
    t = sigma_to_t(sigmas, log_sig)
    return (t.round() if round_timesteps else t).astype(np.int64), sigmas


def custom_sigma_schedule(sig: np.ndarray, num_steps: int, sigmas) -> tuple[np.ndarray, np.ndarray]:
    """(float64[N] fractional model timesteps, float64[N] sigmas) of an explicit schedule, checked:
    N decreasing sigmas inside the training range [sig[0], sig[-1]] (a network knows no others).
    Optimized schedules (e.g. Align Your Steps, Sabour et al. 2024; LD3, Tong et al. 2024) are
    given this way; diffusers takes them as `set_timesteps(timesteps=...)` or `(sigmas=...)`."""
    s = np.asarray(sigmas, np.float64)
    lo, hi = float(sig[0]) * (1 - 1e-6), float(sig[-1]) * (1 + 1e-6)
    if s.shape != (num_steps,) or np.any(np.diff(s) >= 0) or s.min() < lo or s.max() > hi:
        raise ValueError(
            f"sigmas must be {num_steps} decreasing values in the training range "
            f"[{sig[0]:.4g}, {sig[-1]:.4g}], got {np.round(s, 4).tolist()}"
        )
    return sigma_to_t(np.clip(s, sig[0], sig[-1]), np.log(sig)), s


def sigma_schedule_option(
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
    use_lu_lambdas=False,
) -> str | None:
    """diffusers' boolean sigma-schedule flags -> one of SIGMA_SCHEDULES or None."""
    flags = dict(karras=use_karras_sigmas, exponential=use_exponential_sigmas, beta=use_beta_sigmas)
    flags["lu"] = use_lu_lambdas
    chosen = [k for k, v in flags.items() if v]
    if len(chosen) > 1:
        raise ValueError(f"use at most one sigma schedule, got {chosen}")
    return chosen[0] if chosen else None


def check_vp_options(
    prediction_type, variance_type=None, use_flow_sigmas=False, use_dynamic_shifting=False
):
    """These solvers work in VP space with a fixed-variance network; say so for the rest."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}"
        )
    if variance_type is not None:
        raise ValueError(f"variance_type={variance_type!r} (learned variance) is not supported")
    if use_flow_sigmas or use_dynamic_shifting:
        raise ValueError("flow-matching sigmas (use_flow_sigmas/use_dynamic_shifting) unsupported")


def alpha_sigma_lambda(sigmas: np.ndarray):
    """float64 (alpha_t, sigma_t, lambda_t) for VP sigmas (diffusers' `_sigma_to_alpha_sigma_t`);
    sigma = 0 gives lambda = +inf, which the first-order update handles (exp(-inf) = 0)."""
    s = np.asarray(sigmas, np.float64)
    alpha = 1 / np.sqrt(s**2 + 1)
    sigma = s * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
    return alpha, sigma, lam


# --- The plan and its loop --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-step coefficients (host float64, N steps, K history slots, newest output first).

    Step i: m = convert(model_fn(x, timesteps[i]), x, alpha[i], sigma[i]);
    if corrector: x = corr_x[i] x + corr_anchor[i] anchor + corr_hist[i] . [m, hist];
    hist = [m, hist[:-1]]; anchor = x where reset_anchor[i];
    x = c_anchor[i] anchor + c_hist[i] . hist + c_noise[i] z_i.
    """

    timesteps: np.ndarray  # [N] model timesteps, training units
    alpha: np.ndarray  # [N] alpha_t of the solver's sigma at step i (output conversion)
    sigma: np.ndarray  # [N] sigma_t likewise
    c_anchor: np.ndarray  # [N]
    c_hist: np.ndarray  # [N, K]
    reset_anchor: np.ndarray  # bool[N]; the anchor is x itself for multistep solvers
    c_noise: np.ndarray | None = None  # [N], SDE variants
    corrector: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # UniPC: [N], [N], [N, K+1]


def dynamic_threshold(x0: jnp.ndarray, ratio: float, max_value: float) -> jnp.ndarray:
    """Dynamic thresholding (Saharia et al. 2022, Sec. 2.3), per example over all elements, as
    diffusers' `_threshold_sample`: s = clip(quantile(|x0|, ratio), 1, max_value); clip to
    [-s, s] and divide by s."""
    flat = x0.reshape(x0.shape[0], -1)
    s = jnp.clip(jnp.quantile(jnp.abs(flat), ratio, axis=1), 1.0, max_value)[:, None]
    return (jnp.clip(flat, -s, s) / s).reshape(x0.shape)


def convert_output(out, x, alpha, sigma, prediction_type: str, target: str, threshold=None):
    """Network output -> the solver's quantity at (alpha_t, sigma_t) (diffusers'
    `convert_model_output`): target "x0" (data prediction, DPM-Solver++ / UniPC), "eps" (noise
    prediction, DPM-Solver), or "eps_via_x0" (DEIS, which always goes through x0). alpha and sigma
    are given separately (not as alpha_bar) so that no 1 - alpha_bar cancels at low noise."""
    if target == "eps" and threshold is None:
        if prediction_type == "epsilon":
            return out
        if prediction_type == "sample":
            return (x - alpha * out) / sigma
        return alpha * out + sigma * x  # v (Salimans & Ho 2022)
    if target == "eps":  # diffusers thresholds through x0 and back
        eps = convert_output(out, x, alpha, sigma, prediction_type, "eps")
        x0 = threshold((x - sigma * eps) / alpha)
        return (x - alpha * x0) / sigma
    if prediction_type == "epsilon":
        x0 = (x - sigma * out) / alpha
    elif prediction_type == "sample":
        x0 = out
    else:
        x0 = alpha * x - sigma * out
    if threshold is not None:
        x0 = threshold(x0)
    return x0 if target == "x0" else (x - alpha * x0) / sigma


def run_plan(
    model_fn,
    noise: jnp.ndarray,
    plan: Plan,
    rng=None,
    *,
    prediction_type: str,
    target: str,
    threshold=None,
    start_step: int = 0,
    init_latents=None,
) -> jnp.ndarray:
    """Execute a `Plan` in one `lax.fori_loop`; noise: f32[B, ...] standard normal, used as x_T
    (init_noise_sigma = 1 for these VP solvers). Returns f32[B, ...] samples.

    img2img: steps start_step.. from alpha_k init_latents + sigma_k noise; the plan must have been
    built for that start (`multistep_orders(start=...)`), so that no step reads an output from
    before it."""
    n, k = plan.c_hist.shape
    batch = noise.shape[0]
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    ts, alpha, sigma = f32(plan.timesteps), f32(plan.alpha), f32(plan.sigma)
    c_anchor, c_hist, reset = f32(plan.c_anchor), f32(plan.c_hist), jnp.asarray(plan.reset_anchor)
    stochastic = plan.c_noise is not None
    if stochastic:
        c_noise = f32(plan.c_noise)
        if rng is None:
            raise ValueError("this sampler is stochastic: pass a PRNG key as rng")
    if plan.corrector is not None:
        corr_x, corr_anchor, corr_hist = (f32(a) for a in plan.corrector)
    combine = lambda c, h: jnp.tensordot(c, h, axes=1)  # sum_j c[j] h[j]

    def step(i, carry):
        x, anchor, hist, key = carry
        out = model_fn(x, jnp.full((batch,), ts[i]))
        m = convert_output(out, x, alpha[i], sigma[i], prediction_type, target, threshold)
        if plan.corrector is not None:  # UniPC's corrector (UniC) refines x with the new output
            both = jnp.concatenate([m[None], hist])
            x = corr_x[i] * x + corr_anchor[i] * anchor + combine(corr_hist[i], both)
        hist = jnp.concatenate([m[None], hist[:-1]])
        anchor = jnp.where(reset[i], x, anchor)
        x = c_anchor[i] * anchor + combine(c_hist[i], hist)
        if stochastic:
            key, sub = jax.random.split(key)
            x = x + c_noise[i] * normal_like(sub, x)
        return x, anchor, hist, key

    key = rng if rng is not None else jax.random.key(0)
    hist = jnp.zeros((k,) + noise.shape, noise.dtype)
    x = initial_sample(noise, n, start_step, init_latents, lambda i: (alpha[i], sigma[i]))
    x, *_ = jax.lax.fori_loop(start_step, n, step, (x, x, hist, key))
    return x


def unit_vectors(k: int) -> list[np.ndarray]:
    """Coefficient vectors of the history slots (newest first): the update formulas below are
    written on these exactly as diffusers writes them on tensors, and the result is the step's
    coefficient row."""
    return list(np.eye(k))


def multistep_orders(
    num_steps: int,
    solver_order: int,
    lower_order_final: bool,
    first_order_final: bool = False,
    start: int = 0,
) -> list[int]:
    """The order of each step of a multistep solver, as diffusers' `step`: warm up with orders
    1, 2, ... from step `start` (img2img: diffusers' `lower_order_nums` counts from the first
    step run); with `lower_order_final` and fewer than 15 steps in the whole schedule, the last
    two steps use orders 1 and 2 (stabilises few-step sampling); `first_order_final` forces
    order 1 at the last step. Steps before `start` are not run (order 1 there)."""
    orders = []
    few = lower_order_final and num_steps < 15
    for i in range(num_steps):
        last = i == num_steps - 1 and (first_order_final or few)
        second_last = i == num_steps - 2 and few
        o = min(solver_order, max(i - start, 0) + 1)
        if last:
            o = 1
        elif second_last:
            o = min(o, 2)
        orders.append(o)
    return orders
