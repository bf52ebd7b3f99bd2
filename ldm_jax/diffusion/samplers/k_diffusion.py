"""Sigma-space samplers (Karras et al. 2022; k-diffusion): Euler, ancestral Euler, LMS,
DPM-Solver++ SDE, each as its diffusers scheduler (Heun and DPM2: `k_diffusion_two_stage.py`).

They integrate in x = x_VP * sqrt(1 + sigma^2) with sigma = sqrt((1 - abar) / abar) (Karras et
al. 2022, Sec. 2), start from noise * init_noise_sigma, and call the network on the VP input
x / sqrt(sigma^2 + 1) (diffusers' `scale_model_input`) at the scheduler's (fractional) timestep.
Timesteps, sigmas and every step coefficient are computed on the host (`schedules.inference_sigmas`).
The two-stage samplers run diffusers' own interleaved timesteps (first stage, second stage, ...),
one network call per loop iteration, so the compiled loop holds a single copy of the network.
Noise for step or call i is `normal(fold_in(rng, i))`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.objectives import PREDICTION_TYPES
from ldm_jax.diffusion.samplers import (
    check_handoff,
    check_img2img,
    initial_sample,
    normal_like,
    register,
)
from ldm_jax.diffusion.schedules import (
    NoiseSchedule,
    inference_sigmas,
    init_noise_sigma,
    k_alphas_cumprod,
    sigma_to_t,
)


def _check(prediction_type: str):
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}"
        )


def _denoise(model_fn, x, sigma, t, prediction_type, clip_range=None):
    """The x_0 estimate (k-diffusion's `denoised`) from one network call at noise level sigma.

    The conversions are diffusers' (`EulerDiscreteScheduler.step`): eps gives x - sigma * eps,
    v gives -sigma / sqrt(sigma^2 + 1) * v + x / (sigma^2 + 1) (Salimans & Ho 2022, in x-space).
    """
    out = model_fn(x / jnp.sqrt(sigma**2 + 1), jnp.full((x.shape[0],), t, jnp.float32))
    if prediction_type == "epsilon":
        x0 = x - sigma * out
    elif prediction_type == "v_prediction":
        x0 = out * (-sigma / jnp.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)
    else:
        x0 = out
    return x0 if clip_range is None else jnp.clip(x0, -clip_range, clip_range)


def _normal(rng, i, like):
    return normal_like(jax.random.fold_in(rng, i), like)


def _need_rng(rng, name):
    if rng is None:
        raise ValueError(f"sampler {name!r} draws noise: pass a PRNG key as rng")


def _const(a):
    return jnp.asarray(np.asarray(a, np.float32))


def _start(noise, sigmas, num_steps, timestep_spacing, start_step, init_latents, add_noise=True):
    """x at the first step run: noise * init_noise_sigma, or (img2img) init_latents + sigma_k
    noise, diffusers' sigma-space `add_noise` at the first kept step k (or, add_noise=False,
    init_latents as they are)."""
    scale = init_noise_sigma(sigmas, timestep_spacing)
    level = lambda k: (1.0, jnp.float32(sigmas[k]))
    return initial_sample(noise, num_steps, start_step, init_latents, level, scale, add_noise)


@register("euler")
def euler(
    model_fn,
    noise,
    schedule: NoiseSchedule,
    num_steps: int,
    rng=None,
    *,
    prediction_type: str = "epsilon",
    timestep_spacing: str = "linspace",
    steps_offset: int = 0,
    interpolation_type: str = "linear",
    use_karras_sigmas: bool = False,
    use_exponential_sigmas: bool = False,
    use_beta_sigmas: bool = False,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    final_sigmas_type: str = "zero",
    timestep_type: str = "discrete",
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    start_step: int = 0,
    init_latents=None,
    end_step: int | None = None,
    add_noise: bool = True,
):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 with
    S_churn = 0), as diffusers' EulerDiscreteScheduler.

    timestep_type="continuous" with v_prediction calls the network with t = log(sigma) / 4 (EDM's
    c_noise, as diffusers). s_churn > 0 adds Karras' churn noise *before* the network call at the
    raised level sigma_hat = sigma (1 + gamma) (Algorithm 2, k-diffusion `sample_euler`); diffusers
    adds it after the call, with the output of the un-raised sample, so there we follow the paper.
    """
    _check(prediction_type)
    if timestep_type not in ("discrete", "continuous"):
        raise ValueError(f"unknown timestep_type {timestep_type!r}; valid: discrete, continuous")
    ts, sigmas = inference_sigmas(
        schedule,
        num_steps,
        timestep_spacing=timestep_spacing,
        steps_offset=steps_offset,
        interpolation_type=interpolation_type,
        use_karras_sigmas=use_karras_sigmas,
        use_exponential_sigmas=use_exponential_sigmas,
        use_beta_sigmas=use_beta_sigmas,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        final_sigmas_type=final_sigmas_type,
    )
    churn = s_churn > 0
    gamma = np.where(
        (s_tmin <= sigmas[:-1]) & (sigmas[:-1] <= s_tmax),
        min(s_churn / num_steps, 2**0.5 - 1),
        0.0,
    )
    sigma_hat = (sigmas[:-1].astype(np.float64) * (gamma + 1)).astype(np.float32)
    if churn:
        _need_rng(rng, "euler (s_churn > 0)")
        ts = np.where(gamma > 0, sigma_to_t(sigma_hat, k_alphas_cumprod(schedule)), ts)
    if timestep_type == "continuous" and prediction_type == "v_prediction":
        ts = 0.25 * np.log(sigma_hat)
    ts, sig, hat = _const(ts), _const(sigmas), _const(sigma_hat)

    def step(i, x):
        if churn:  # Algorithm 2, lines 5-6
            x = x + _normal(rng, i, x) * s_noise * jnp.sqrt(hat[i] ** 2 - sig[i] ** 2)
        x0 = _denoise(model_fn, x, hat[i], ts[i], prediction_type)
        d = (x - x0) / hat[i]
        return x + d * (sig[i + 1] - hat[i])

    end = check_handoff(num_steps, start_step, end_step, add_noise, init_latents)
    x = _start(noise, sigmas, num_steps, timestep_spacing, start_step, init_latents, add_noise)
    return jax.lax.fori_loop(start_step, end, step, x)


@register("euler_ancestral")
def euler_ancestral(
    model_fn,
    noise,
    schedule: NoiseSchedule,
    num_steps: int,
    rng=None,
    *,
    prediction_type: str = "epsilon",
    timestep_spacing: str = "linspace",
    steps_offset: int = 0,
    start_step: int = 0,
    init_latents=None,
    end_step: int | None = None,
    add_noise: bool = True,
):
    """Ancestral Euler (k-diffusion `sample_euler_ancestral`), as diffusers'
    EulerAncestralDiscreteScheduler: an Euler step down to sigma_down, then fresh noise of std
    sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2 (the DDPM posterior's split)."""
    _check(prediction_type)
    _need_rng(rng, "euler_ancestral")
    ts, sigmas = inference_sigmas(
        schedule, num_steps, timestep_spacing=timestep_spacing, steps_offset=steps_offset
    )
    s = sigmas.astype(np.float64)
    up = np.sqrt(s[1:] ** 2 * (s[:-1] ** 2 - s[1:] ** 2) / s[:-1] ** 2)
    down = np.sqrt(s[1:] ** 2 - up**2)
    ts, sig, up, down = _const(ts), _const(sigmas), _const(up), _const(down)

    def step(i, x):
        x0 = _denoise(model_fn, x, sig[i], ts[i], prediction_type)
        d = (x - x0) / sig[i]
        return x + d * (down[i] - sig[i]) + _normal(rng, i, x) * up[i]

    end = check_handoff(num_steps, start_step, end_step, add_noise, init_latents)
    x = _start(noise, sigmas, num_steps, timestep_spacing, start_step, init_latents, add_noise)
    return jax.lax.fori_loop(start_step, end, step, x)


def _lms_coefficients(sigmas: np.ndarray, order: int, start: int = 0) -> np.ndarray:
    """float64[N, order]: c[i, j] = integral over [sigma_i, sigma_{i+1}] of the Lagrange basis
    polynomial of node sigma_{i-j} among sigma_i, ..., sigma_{i-o+1}, o = min(i - start + 1,
    order) (linear multistep, k-diffusion `linear_multistep_coeff`; diffusers integrates it with
    scipy's quad, exact for these cubics, we integrate the polynomial exactly). The warm-up
    counts from `start`, the first step run (img2img)."""
    s = sigmas.astype(np.float64)
    n = len(s) - 1
    c = np.zeros((n, order))
    for i in range(n):
        o = min(max(i - start, 0) + 1, order)
        for j in range(o):
            others = [s[i - k] for k in range(o) if k != j]
            basis = np.polynomial.Polynomial([1.0])
            for r in others:
                basis = basis * np.polynomial.Polynomial([-r, 1.0]) / (s[i - j] - r)
            prim = basis.integ()
            c[i, j] = prim(s[i + 1]) - prim(s[i])
    return c


@register("lms")
def lms(
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
    order: int = 4,
    start_step: int = 0,
    init_latents=None,
    end_step: int | None = None,
    add_noise: bool = True,
):
    """Linear multistep in sigma (k-diffusion `sample_lms`), as diffusers' LMSDiscreteScheduler
    with its default `order=4`: x += sum_j c_ij d_{i-j} over the last `order` derivatives.

    img2img (start_step k > 0) differs from diffusers on purpose: diffusers takes the order
    min(step_index + 1, 4) of the whole schedule, so its first kept steps weight the one to three
    derivatives they have with a 4-node rule's coefficients (the interpolation nodes of steps it
    never ran), an O(1) error; here the warm-up restarts at step k (orders 1, 2, 3, 4), as in a
    fresh run: 3.8x closer to the converged ODE solution at 50 steps from step 20
    (tests/test_samplers_img2img.py)."""
    _check(prediction_type)
    if not 1 <= order <= 4:
        raise ValueError(f"lms order must be in 1..4, got {order}")
    ts, sigmas = inference_sigmas(
        schedule,
        num_steps,
        timestep_spacing=timestep_spacing,
        steps_offset=steps_offset,
        use_karras_sigmas=use_karras_sigmas,
        use_exponential_sigmas=use_exponential_sigmas,
        use_beta_sigmas=use_beta_sigmas,
    )
    check_img2img(noise, num_steps, start_step, init_latents)  # before start_step is used
    coeffs = _const(_lms_coefficients(sigmas, order, start_step))
    ts, sig = _const(ts), _const(sigmas)

    def step(i, carry):
        x, hist = carry  # hist[j]: the derivative of step i - 1 - j
        x0 = _denoise(model_fn, x, sig[i], ts[i], prediction_type)
        hist = jnp.concatenate([((x - x0) / sig[i])[None], hist[:-1]])
        x = x + jnp.tensordot(coeffs[i], hist, axes=1)
        return x, hist

    end = check_handoff(num_steps, start_step, end_step, add_noise, init_latents)
    x = _start(noise, sigmas, num_steps, timestep_spacing, start_step, init_latents, add_noise)
    hist = jnp.zeros((order,) + x.shape, x.dtype)
    return jax.lax.fori_loop(start_step, end, step, (x, hist))[0]


def _two_stage(
    model_fn, x, calls, prediction_type, rng=None, clip_range=None, start_step=0, end_step=None
):
    """The loop shared by Heun, DPM2 and ancestral DPM2, one network call per iteration.

    calls: host arrays over the 2N-1 calls of diffusers' interleaved timesteps: t, sigma (the level
    the network is called at), first (bool: a first stage), dt, w (second stage: weight of the
    first stage's derivative) and up (second stage: std of the added noise, ancestral only).
    A first stage saves (x, d) and steps x + d dt; a second stage steps from the saved x with
    (w d_first + (1 - w) d) dt (+ up z). Step k starts at call 2k (img2img: diffusers'
    `timesteps[k * order:]`); end_step: the calls run end there (diffusers' `timesteps[:k]`,
    possibly after a first stage: x is then the Euler step to the next level, as diffusers'
    scheduler leaves it).
    """
    n = len(calls["t"])
    c = {k: _const(v) for k, v in calls.items()}
    ancestral = bool(np.any(calls["up"] > 0))

    def step(j, carry):
        x, x_saved, d_saved = carry
        sigma = c["sigma"][j]
        x0 = _denoise(model_fn, x, sigma, c["t"][j], prediction_type, clip_range)
        d = (x - x0) / sigma
        first = c["first"][j] > 0
        second = x_saved + (c["w"][j] * d_saved + (1 - c["w"][j]) * d) * c["dt"][j]
        if ancestral:
            second = second + _normal(rng, j, x) * c["up"][j]
        x_new = jnp.where(first, x + d * c["dt"][j], second)
        return x_new, jnp.where(first, x, x_saved), jnp.where(first, d, d_saved)

    zeros = jnp.zeros_like(x)
    end = n if end_step is None else end_step
    return jax.lax.fori_loop(2 * start_step, end, step, (x, zeros, zeros))[0]


def _interleave(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """[f_0, s_0, f_1, s_1, ..., f_{N-1}]: N first-stage values, N-1 second-stage values."""
    out = np.empty(len(first) + len(second), np.float64)
    out[0::2], out[1::2] = first, second
    return out


@register("dpmpp_sde")
def dpmpp_sde(
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
    s_noise: float = 1.0,
    start_step: int = 0,
    init_latents=None,
):
    """DPM-Solver++ (stochastic, k-diffusion `sample_dpmpp_sde` with eta = 1, r = 1/2), the
    algorithm of diffusers' DPMSolverSDEScheduler (same timesteps and midpoints, 2N - 1 calls).

    In lambda = -log sigma, each step goes ancestrally (noise of std sigma_up, DPM-Solver-1 to
    sigma_down) to the log-midpoint s, re-evaluates there, and takes the whole step from the saved x
    with the midpoint's x_0 estimate. The noise is a Brownian motion W in sigma: k-diffusion and
    diffusers draw it from a torchsde Brownian tree; we draw the same law with plain Gaussian
    increments: z1 = (W(sigma_i) - W(s)) / sqrt(sigma_i - s) and
    z2 = (W(sigma_i) - W(sigma_{i+1})) / sqrt(sigma_i - sigma_{i+1}) share the increment over
    [s, sigma_i]. So samples match diffusers in distribution, not draw for draw.
    """
    _check(prediction_type)
    _need_rng(rng, "dpmpp_sde")
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
    mid = np.sqrt(s[: n - 1] * s[1:n])  # sigma at the midpoint of -log sigma

    def ancestral(frm, to):  # k-diffusion `get_ancestral_step`, eta = 1
        up = np.minimum(to, np.sqrt(to**2 * (frm**2 - to**2) / frm**2))
        return np.sqrt(to**2 - up**2), up

    down1, up1 = ancestral(s[: n - 1], mid)
    down2, up2 = ancestral(s[: n - 1], s[1:n])
    calls = dict(
        t=_interleave(ts, sigma_to_t(mid, k_alphas_cumprod(schedule))),
        sigma=_interleave(s[:-1], mid),
        first=_interleave(np.ones(n), np.zeros(n - 1)),
        # x_new = ratio x_from + (1 - ratio) x0 with ratio = sigma_down / sigma_from: the
        # DPM-Solver++(1) step to sigma_down (Lu et al. 2022b, Eq. 9, diffusers' expm1 form);
        # the last step goes to sigma_N = 0, i.e. to x0.
        ratio=_interleave(np.append(down1 / s[: n - 1], 0.0), down2 / s[: n - 1]),
        up=_interleave(np.append(up1, 0.0), up2) * s_noise,
        # z2 = a z1 + b g: the Brownian increment over [sigma_{i+1}, sigma_i] given the one over
        # [mid, sigma_i] (indexed by call; used at second stages only)
        a=_interleave(np.zeros(n), np.sqrt((s[: n - 1] - mid) / (s[: n - 1] - s[1:n]))),
        b=_interleave(np.ones(n), np.sqrt((mid - s[1:n]) / (s[: n - 1] - s[1:n]))),
    )
    c = {k: _const(v) for k, v in calls.items()}

    def step(j, carry):
        x, x_saved, z1 = carry
        x0 = _denoise(model_fn, x, c["sigma"][j], c["t"][j], prediction_type)
        first = c["first"][j] > 0
        g = _normal(rng, j, x)
        z = c["a"][j] * z1 + c["b"][j] * g  # = g at first stages
        base = jnp.where(first, x, x_saved)
        ratio = c["ratio"][j]
        x_new = ratio * base + (1 - ratio) * x0 + z * c["up"][j]
        return x_new, jnp.where(first, x, x_saved), jnp.where(first, g, z1)

    x = _start(noise, sigmas, num_steps, timestep_spacing, start_step, init_latents)
    zeros = jnp.zeros_like(x)
    return jax.lax.fori_loop(2 * start_step, 2 * n - 1, step, (x, zeros, zeros))[0]
