"""Noise schedules: betas, alphas_cumprod and inference timesteps, in diffusers' vocabulary.

Names follow diffusers (`beta_schedule`, `timestep_spacing`, `steps_offset`) so that a
`scheduler_config.json` from a real checkpoint means the same thing here. Everything is computed
once on the host in float64 and handed to jitted code as float32 constants.
"""

from __future__ import annotations

import math

import flax.struct
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def make_betas(
    beta_schedule: str,
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
) -> np.ndarray:
    """float64[num_train_timesteps] betas, as diffusers' DDPMScheduler builds them."""
    n = num_train_timesteps
    if beta_schedule == "linear":  # Ho et al. 2020, Sec. 4
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if beta_schedule == "scaled_linear":  # Stable Diffusion: linear in sqrt(beta)
        return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    if (
        beta_schedule == "squaredcos_cap_v2"
    ):  # Nichol & Dhariwal 2021, Eq. 17, betas capped at 0.999

        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
            dtype=np.float64,
        )
    if beta_schedule == "sigmoid":  # GeoDiff (Xu et al. 2022), as in diffusers
        x = np.linspace(-6, 6, n, dtype=np.float64)
        return 1 / (1 + np.exp(-x)) * (beta_end - beta_start) + beta_start
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; valid: {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so that the last timestep has zero SNR (Lin et al. 2024, Algorithm 1)."""
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - betas))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


@flax.struct.dataclass
class NoiseSchedule:
    """A discrete variance-preserving schedule: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""

    alphas_cumprod: jnp.ndarray  # float32[num_train_timesteps]

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]


def make_schedule(
    beta_schedule: str = "scaled_linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    rescale_betas_zero_snr: bool = False,
) -> NoiseSchedule:
    betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    alphas_cumprod = np.cumprod(1.0 - betas)
    return NoiseSchedule(alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32))


def schedule_from_config(config) -> NoiseSchedule:
    """From a ConfigDict / dict with diffusers' scheduler field names."""
    get = config.get
    return make_schedule(
        beta_schedule=get("beta_schedule", "scaled_linear"),
        num_train_timesteps=get("num_train_timesteps", 1000),
        beta_start=get("beta_start", 0.00085),
        beta_end=get("beta_end", 0.012),
        rescale_betas_zero_snr=get("rescale_betas_zero_snr", False),
    )


def inference_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
) -> np.ndarray:
    """int64[num_inference_steps] timesteps in decreasing order, as diffusers' DDIM/DDPM schedulers.

    Table 2 of Lin et al. 2024 describes the three spacings; e.g. leading with steps_offset=1 and
    5 steps of 1000 gives 801, 601, 401, 201, 1.
    """
    n, big_t = num_inference_steps, num_train_timesteps
    if not 1 <= n <= big_t:
        raise ValueError(f"num_inference_steps must be in [1, {big_t}], got {n}")
    if timestep_spacing == "leading":
        ratio = big_t // n
        ts = (np.arange(n) * ratio).round()[::-1].astype(np.int64) + steps_offset
    elif timestep_spacing == "trailing":
        ratio = big_t / n
        ts = np.round(np.arange(big_t, 0, -ratio)).astype(np.int64) - 1
    elif timestep_spacing == "linspace":
        ts = np.linspace(0, big_t - 1, n).round()[::-1].astype(np.int64)
    else:
        raise ValueError(
            f"unknown timestep_spacing {timestep_spacing!r}; valid: {', '.join(TIMESTEP_SPACINGS)}"
        )
    return ts


# --- Sigma space (Karras et al. 2022): x = x_VP / sqrt(abar), sigma = sqrt((1 - abar) / abar). ---


def sigmas_from_alphas_cumprod(alphas_cumprod) -> np.ndarray:
    """float64[T] noise levels of the training timesteps, increasing with t."""
    acp = np.asarray(alphas_cumprod, np.float64)
    return np.sqrt((1.0 - acp) / acp)


def sigma_to_t(sigma, alphas_cumprod) -> np.ndarray:
    """Fractional training timestep of each sigma, by linear interpolation of log sigma between
    the neighbouring integer timesteps (diffusers' `_sigma_to_t`; clipped to [0, T-1]). Host-side."""
    log_sigmas = np.log(sigmas_from_alphas_cumprod(alphas_cumprod))
    log_sigma = np.log(np.maximum(np.asarray(sigma, np.float64), 1e-10))
    dists = log_sigma - log_sigmas[:, None] if log_sigma.ndim else log_sigma - log_sigmas
    dists = dists.reshape(len(log_sigmas), -1)
    low = np.clip(np.cumsum(dists >= 0, axis=0).argmax(axis=0), None, len(log_sigmas) - 2)
    w = np.clip(
        (log_sigmas[low] - log_sigma.ravel()) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1
    )
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigma))


def t_to_sigma(t: jnp.ndarray, schedule: NoiseSchedule) -> jnp.ndarray:
    """The inverse of `sigma_to_t` inside jitted code: sigma at fractional timesteps t: f32[B],
    interpolating log sigma linearly between integer timesteps (exact at integers)."""
    acp = schedule.alphas_cumprod
    log_sigmas = 0.5 * (jnp.log1p(-acp) - jnp.log(acp))
    grid = jnp.arange(acp.shape[0], dtype=jnp.float32)
    return jnp.exp(jnp.interp(t, grid, log_sigmas))


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0):
    """float64[num_steps] decreasing sigmas, Karras et al. 2022, Eq. 5."""
    ramp = np.linspace(0, 1, num_steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(num_steps: int, sigma_min: float, sigma_max: float):
    """float64[num_steps] sigmas uniform in log sigma (k-diffusion `get_sigmas_exponential`)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_steps))


def polyexponential_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 1.0):
    """float64[num_steps] sigmas with log sigma polynomial in the step (k-diffusion
    `get_sigmas_polyexponential`); rho=1 is `exponential_sigmas`."""
    ramp = np.linspace(1, 0, num_steps) ** rho
    return np.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
