"""Noise schedules: betas, alphas_cumprod and inference timesteps, in diffusers' vocabulary.

Names follow diffusers (`beta_schedule`, `timestep_spacing`, `steps_offset`) so that a
`scheduler_config.json` from a real checkpoint means the same thing here. Everything is computed
once on the host in float64 and handed to jitted code as float32 constants.
"""

from __future__ import annotations

import json
import math
import pathlib

import flax.struct
import jax
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


def beta_sigmas(
    num_steps: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta: float = 0.6
):
    """float64[num_steps] decreasing sigmas at the quantiles of a Beta(alpha, beta) law between
    sigma_min and sigma_max (Lee et al. 2024, "Beta Sampling is All You Need"; diffusers'
    `_convert_to_beta`)."""
    from scipy import stats  # only this optional schedule needs scipy

    ppf = stats.beta.ppf(1 - np.linspace(0, 1, num_steps), alpha, beta)
    return sigma_min + ppf * (sigma_max - sigma_min)


def concrete_alphas_cumprod(schedule: NoiseSchedule) -> np.ndarray:
    """float64[T] alphas_cumprod on the host, for samplers that precompute their coefficients."""
    try:
        return np.array(schedule.alphas_cumprod, np.float64)
    except jax.errors.TracerArrayConversionError as e:
        raise ValueError(
            "this sampler computes its coefficients on the host: the schedule must be a concrete "
            "NoiseSchedule (close over it instead of passing it as a traced jit argument)"
        ) from e


def k_alphas_cumprod(schedule: NoiseSchedule) -> np.ndarray:
    """`concrete_alphas_cumprod` for sigma-space samplers: a zero-terminal-SNR schedule has
    abar = 0 (sigma = inf) at its last step, which diffusers' sigma-space schedulers replace by
    2**-24 ("close to 0 without being 0 so first sigma is not inf"), and so do we."""
    acp = concrete_alphas_cumprod(schedule)
    acp[acp == 0.0] = 2.0**-24
    return acp


def sigma_space_timesteps(
    num_steps: int,
    num_train_timesteps: int = 1000,
    timestep_spacing: str = "linspace",
    steps_offset: int = 0,
) -> np.ndarray:
    """float32[num_steps] decreasing, possibly fractional timesteps of diffusers' sigma-space
    schedulers (Euler, Heun, LMS, KDPM2, ...): unlike `inference_timesteps`, "linspace" is not
    rounded (Lin et al. 2024, Table 2)."""
    n, big_t = num_steps, num_train_timesteps
    if not 1 <= n <= big_t:
        raise ValueError(f"num_steps must be in [1, {big_t}], got {n}")
    if timestep_spacing == "linspace":
        return np.linspace(0, big_t - 1, n, dtype=np.float32)[::-1].copy()
    if timestep_spacing == "leading":
        ts = (np.arange(n) * (big_t // n)).round()[::-1].astype(np.float32)
        return ts + np.float32(steps_offset)
    if timestep_spacing == "trailing":
        return np.arange(big_t, 0, -big_t / n).round().astype(np.float32) - 1
    raise ValueError(
        f"unknown timestep_spacing {timestep_spacing!r}; valid: {', '.join(TIMESTEP_SPACINGS)}"
    )


def inference_sigmas(
    schedule: NoiseSchedule,
    num_steps: int,
    *,
    timestep_spacing: str = "linspace",
    steps_offset: int = 0,
    interpolation_type: str = "linear",
    use_karras_sigmas: bool = False,
    use_exponential_sigmas: bool = False,
    use_beta_sigmas: bool = False,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    final_sigmas_type: str = "zero",
    round_karras_timesteps: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps float32[N], sigmas float32[N+1]) of diffusers' sigma-space schedulers'
    `set_timesteps` (EulerDiscreteScheduler and its Heun/LMS/KDPM2/DPMSolverSDE copies).

    sigmas are the training sigmas interpolated linearly in t at the spaced timesteps, optionally
    replaced by a Karras (Eq. 5 of Karras et al. 2022), exponential or beta schedule between the
    first and last of them (or `sigma_min`/`sigma_max`), whose timesteps are then `sigma_to_t`;
    the last sigma is 0 ("zero") or the smallest training sigma ("sigma_min").
    Quirks kept from diffusers: KDPM2 rounds its Karras timesteps (`round_karras_timesteps`), and
    `interpolation_type="log_linear"` ignores the timesteps, taking N+1 sigmas log-uniform between
    the largest and smallest training sigma, so that the last step ends at the smallest training
    sigma and the appended final sigma is never used (we return the N+1 that are).
    """
    if use_karras_sigmas + use_exponential_sigmas + use_beta_sigmas > 1:
        raise ValueError(
            "only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set"
        )
    acp = k_alphas_cumprod(schedule)
    train_sigmas = sigmas_from_alphas_cumprod(acp)
    ts = sigma_space_timesteps(num_steps, len(acp), timestep_spacing, steps_offset)
    if interpolation_type == "linear":
        sigmas = np.interp(ts, np.arange(len(acp)), train_sigmas)
    elif interpolation_type == "log_linear":
        sigmas = np.exp(
            np.linspace(np.log(train_sigmas[-1]), np.log(train_sigmas[0]), num_steps + 1)
        )
    else:
        raise ValueError(
            f"unknown interpolation_type {interpolation_type!r}; valid: linear, log_linear"
        )
    lo = sigma_min if sigma_min is not None else float(sigmas[-1])
    hi = sigma_max if sigma_max is not None else float(sigmas[0])
    if use_karras_sigmas:
        sigmas = karras_sigmas(num_steps, lo, hi)
    elif use_exponential_sigmas:
        sigmas = exponential_sigmas(num_steps, lo, hi)
    elif use_beta_sigmas:
        sigmas = beta_sigmas(num_steps, lo, hi)
    if use_karras_sigmas or use_exponential_sigmas or use_beta_sigmas:
        ts = sigma_to_t(sigmas, acp)
        if use_karras_sigmas and round_karras_timesteps:
            ts = ts.round()
    if final_sigmas_type == "zero":
        last = 0.0
    elif final_sigmas_type == "sigma_min":
        last = train_sigmas[0]
    else:
        raise ValueError(f"unknown final_sigmas_type {final_sigmas_type!r}; valid: zero, sigma_min")
    sigmas = np.concatenate([sigmas, [last]])[: num_steps + 1].astype(np.float32)
    return np.asarray(ts, np.float32), sigmas


def init_noise_sigma(sigmas: np.ndarray, timestep_spacing: str) -> float:
    """diffusers' `init_noise_sigma` of the sigma-space schedulers: sigma_max, or
    sqrt(sigma_max^2 + 1) for "leading" spacing (whose first timestep is below T - 1)."""
    top = float(np.max(sigmas))
    return top if timestep_spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5


# --- Import of a diffusers scheduler_config.json. ---
#
# Per diffusers class (0.42): our sampler, the class's own beta-schedule defaults (they differ
# between classes: a field missing from a config takes the class default, as in diffusers), and
# the class's other `__init__` fields. Keys a class does not take are ignored, as diffusers'
# `from_config` ignores them (SD configs carry e.g. `skip_prk_steps` into DDIM/Euler configs).
_LINEAR = ("linear", 0.0001, 0.02)
_LINEAR_SD = ("linear", 0.00085, 0.012)
_BASE = "prediction_type timestep_spacing steps_offset "
_K = _BASE + "use_karras_sigmas use_exponential_sigmas use_beta_sigmas "
_THRESH = "thresholding dynamic_thresholding_ratio sample_max_value "
_CLIP = "clip_sample clip_sample_range "
_MULTI = _K + _THRESH + "solver_order lower_order_final use_flow_sigmas flow_shift "
_MULTI += "use_dynamic_shifting time_shift_type final_sigmas_type "
_DPM = "algorithm_type solver_type lambda_min_clipped variance_type "
SCHEDULER_CLASSES = {
    cls: (name, betas, tuple(fields.split()))
    for cls, name, betas, fields in [
        ("DDIMScheduler", "ddim", _LINEAR, _BASE + _THRESH + _CLIP + "set_alpha_to_one"),
        ("DDPMScheduler", "ddpm", _LINEAR, _BASE + _THRESH + _CLIP + "variance_type"),
        ("PNDMScheduler", "pndm", _LINEAR, _BASE + "skip_prk_steps set_alpha_to_one"),
        (
            "EulerDiscreteScheduler",
            "euler",
            _LINEAR,
            _K + "interpolation_type sigma_min sigma_max timestep_type final_sigmas_type",
        ),
        ("EulerAncestralDiscreteScheduler", "euler_ancestral", _LINEAR, _BASE),
        ("HeunDiscreteScheduler", "heun", _LINEAR_SD, _K + _CLIP),
        ("LMSDiscreteScheduler", "lms", _LINEAR, _K),
        ("KDPM2DiscreteScheduler", "dpm2", _LINEAR_SD, _K),
        ("KDPM2AncestralDiscreteScheduler", "dpm2_ancestral", _LINEAR_SD, _K),
        ("DPMSolverSDEScheduler", "dpmpp_sde", _LINEAR_SD, _K + "noise_sampler_seed"),
        (
            "DPMSolverMultistepScheduler",
            "dpm_solver_multistep",
            _LINEAR,
            _MULTI + _DPM + "euler_at_final use_lu_lambdas",
        ),
        (  # the singlestep class takes no timestep_spacing / steps_offset
            "DPMSolverSinglestepScheduler",
            "dpm_solver_singlestep",
            _LINEAR,
            _MULTI.replace("timestep_spacing steps_offset ", "") + _DPM,
        ),
        (
            "UniPCMultistepScheduler",
            "unipc",
            _LINEAR,
            _MULTI + "predict_x0 solver_type disable_corrector solver_p sigma_min sigma_max "
            "shift_terminal",
        ),
        (  # DEIS takes no final_sigmas_type
            "DEISMultistepScheduler",
            "deis",
            _LINEAR,
            _MULTI.replace("final_sigmas_type ", "") + "algorithm_type solver_type",
        ),
        (
            "LCMScheduler",
            "lcm",
            ("scaled_linear", 0.00085, 0.012),
            _BASE + _THRESH + _CLIP + "original_inference_steps set_alpha_to_one timestep_scaling",
        ),
    ]
}
# The classes that take `rescale_betas_zero_snr` (the others ignore it).
_ZERO_SNR_CLASSES = (
    "DDIMScheduler",
    "DDPMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "LCMScheduler",
)
# Dropped because they change nothing here: the noise seed of DPMSolverSDEScheduler's torchsde
# Brownian tree (our samplers draw from the rng they are given), and switches that are off (with
# the parameters only they use). Clipping is off by default in every sampler here; DDIM and DDPM
# clip by default in diffusers, so a config of theirs that omits clip_sample gets it set (below).
_IRRELEVANT = ("noise_sampler_seed",)
_OFF_SWITCHES = {
    "thresholding": ("dynamic_thresholding_ratio", "sample_max_value"),
    "clip_sample": ("clip_sample_range",),
}
# What our ddim/ddpm do without taking an option for it (diffusers' name and value).
_IMPLIED = {"ddim": {"set_alpha_to_one": True}, "ddpm": {"variance_type": "fixed_small"}}


# The scheduler of checkpoints without a scheduler_config.json (original single files): SD's
# training betas (Rombach et al. 2022, "linear_start/linear_end" of the original configs) and
# diffusers' SD step spacing; a config's own fields override these.
SD_SCHEDULER_DEFAULTS = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "clip_sample": False,
}


def sampler_from_scheduler_config(cfg) -> tuple[str, dict, NoiseSchedule]:
    """(sampler name, options, schedule) meaning what a diffusers `scheduler_config.json` means.

    cfg: the parsed dict, or a path to the json. Options keep diffusers' names and go to the
    sampler as keyword arguments; one it does not implement fails there with a TypeError naming it
    (e.g. DDIM's `set_alpha_to_one=False`). PNDMScheduler maps to "pndm", or with `skip_prk_steps`
    to "plms". `trained_betas` replaces the beta schedule.
    """
    if not isinstance(cfg, dict):
        cfg = json.loads(pathlib.Path(cfg).read_text())
    cls = cfg.get("_class_name")
    if cls not in SCHEDULER_CLASSES:
        raise ValueError(
            f"unsupported scheduler _class_name {cls!r}; supported: {', '.join(SCHEDULER_CLASSES)}"
        )
    name, (beta_schedule, beta_start, beta_end), fields = SCHEDULER_CLASSES[cls]

    get = lambda k, default: default if cfg.get(k) is None else cfg[k]
    big_t = int(get("num_train_timesteps", 1000))
    if cfg.get("trained_betas") is not None:
        betas = np.asarray(cfg["trained_betas"], np.float64)
        if betas.shape != (big_t,):
            raise ValueError(f"trained_betas has shape {betas.shape}, expected ({big_t},)")
    else:
        betas = make_betas(
            get("beta_schedule", beta_schedule),
            big_t,
            float(get("beta_start", beta_start)),
            float(get("beta_end", beta_end)),
        )
    if cls in _ZERO_SNR_CLASSES and cfg.get("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    schedule = NoiseSchedule(alphas_cumprod=jnp.asarray(np.cumprod(1.0 - betas), jnp.float32))

    options = {k: cfg[k] for k in fields if k in cfg and k not in _IRRELEVANT}
    if name in ("ddim", "ddpm"):
        options.setdefault("clip_sample", True)  # diffusers' default for these two classes
    if name == "pndm" and options.pop("skip_prk_steps", False):
        name = "plms"
    options.pop("skip_prk_steps", None)
    for switch, params in _OFF_SWITCHES.items():
        if not options.get(switch, False):
            for k in (switch, *params):
                options.pop(k, None)
    for k, v in _IMPLIED.get(name, {}).items():
        if options.get(k, v) == v:
            options.pop(k, None)
    return name, options, schedule
