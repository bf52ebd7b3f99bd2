"""img2img (`start_step`, `init_latents`) of every sampler against diffusers' img2img loop.

diffusers' img2img pipelines (`StableDiffusionImg2ImgPipeline.get_timesteps`) keep
`scheduler.timesteps[k * order:]`, call `set_begin_index(k * order)` where the scheduler has it,
and start from `scheduler.add_noise(init_latents, noise, timesteps[:1])`. Here both sides are
driven by the exact denoiser of a Gaussian mixture (`gaussian_mixture.exact_model_fn`) from the
same clean latents and noise; final samples must agree to 1e-4 (float32), as in the text-to-image
parity tests (tests/test_samplers_k.py, tests/test_samplers_dpm.py).

LMS and PNDM/PLMS are the exceptions where diffusers' truncation is not a consistent integrator
(see their docstrings); they are checked against diffusers' own step arithmetic restarted at the
first kept step, and `test_consistent_img2img_beats_diffusers_truncation` measures the difference.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import samplers, schedules
from ldm_jax.diffusion.gaussian_mixture import default_mixture, exact_model_fn

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
LINEAR = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
GMM = default_mixture(2)
BATCH = 64
ATOL = 1e-4


@functools.cache
def _schedule(config):
    ref = diffusers.DDPMScheduler(**dict(config))
    return schedules.NoiseSchedule(alphas_cumprod=jnp.asarray(ref.alphas_cumprod.numpy()))


@functools.cache
def _model(config, prediction_type):
    return jax.jit(exact_model_fn(GMM, _schedule(config), prediction_type))


def _inputs(seed=0):
    """(clean latents: exact data samples, noise)."""
    x0 = np.asarray(GMM.sample(jax.random.key(seed), BATCH), np.float32)
    noise = np.random.default_rng(seed).standard_normal((BATCH, 2)).astype(np.float32)
    return x0, noise


def _call(model, x, t):
    out = model(jnp.asarray(x.numpy()), jnp.full((BATCH,), float(t), jnp.float32))
    return torch.from_numpy(np.array(out))


def diffusers_img2img(ref, model, x0, noise, steps, start, timesteps=None, **step_kwargs):
    """diffusers' img2img loop (its pipelines' get_timesteps + add_noise + step loop); explicit
    `timesteps` replace the truncated ones (the restarted references below); `step_kwargs` go
    to every `ref.step` (DDIM's eta)."""
    ref.set_timesteps(steps)
    begin = start * ref.order
    if timesteps is None:
        timesteps = ref.timesteps[begin:]
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(begin)
    x = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), timesteps[:1])
    for t in timesteps:
        out = _call(model, ref.scale_model_input(x, t), t)
        x = ref.step(out, t, x, **step_kwargs).prev_sample
    return x.numpy()


def ours(name, config, steps, start, x0, noise, options, rng=None):
    prediction_type = options.get("prediction_type", "epsilon")
    model = _model(tuple(config.items()), prediction_type)
    fn = samplers.get_sampler(name)
    run = jax.jit(
        lambda x0, n, key: fn(
            model, n, _schedule(tuple(config.items())), steps, key, start_step=start,
            init_latents=x0, **options,
        )
    )  # fmt: skip
    return np.asarray(run(jnp.asarray(x0), jnp.asarray(noise), rng))


STEP_OPTIONS = ("eta",)  # arguments of diffusers' `step`, not of the scheduler's constructor


def _reference(cls, config, options):
    extra = {k: v for k, v in options.items() if k not in ("prediction_type", *STEP_OPTIONS)}
    prediction_type = options.get("prediction_type", "epsilon")
    return getattr(diffusers, cls)(**config, prediction_type=prediction_type, **extra)


def case(name, cls, steps, start, config=SD, **options):
    label = f"{name}-{steps}-from{start}-{'-'.join(options) or 'default'}"
    return pytest.param(name, cls, steps, start, config, options, id=label)


DETERMINISTIC = [
    case("ddim", "DDIMScheduler", 10, 3, timestep_spacing="leading", steps_offset=1, clip_sample=False),
    case(
        "ddim", "DDIMScheduler", 12, 6,
        prediction_type="v_prediction", set_alpha_to_one=False, clip_sample=False,
    ),
    case("euler", "EulerDiscreteScheduler", 10, 4),
    case("euler", "EulerDiscreteScheduler", 8, 3, use_karras_sigmas=True, timestep_spacing="leading"),
    case("heun", "HeunDiscreteScheduler", 10, 4),
    case("heun", "HeunDiscreteScheduler", 8, 1, prediction_type="v_prediction"),
    case("dpm2", "KDPM2DiscreteScheduler", 10, 5),
    case("dpm2", "KDPM2DiscreteScheduler", 7, 2, use_karras_sigmas=True),
    case("dpm_solver_multistep", "DPMSolverMultistepScheduler", 10, 4),
    case("dpm_solver_multistep", "DPMSolverMultistepScheduler", 20, 5, solver_order=3),
    case(
        "dpm_solver_multistep", "DPMSolverMultistepScheduler", 12, 7,
        use_karras_sigmas=True, prediction_type="v_prediction",
    ),
    case(
        "dpm_solver_multistep", "DPMSolverMultistepScheduler", 10, 3,
        algorithm_type="dpmsolver", final_sigmas_type="sigma_min",
    ),
    case("dpm_solver_singlestep", "DPMSolverSinglestepScheduler", 12, 3, solver_order=3),
    case("dpm_solver_singlestep", "DPMSolverSinglestepScheduler", 12, 4, solver_order=3),
    case("dpm_solver_singlestep", "DPMSolverSinglestepScheduler", 10, 5, solver_order=2),
    case("unipc", "UniPCMultistepScheduler", 10, 4),
    case("unipc", "UniPCMultistepScheduler", 20, 6, solver_order=3, use_karras_sigmas=True),
    case("unipc", "UniPCMultistepScheduler", 10, 2, predict_x0=False, solver_type="bh1"),
    case("deis", "DEISMultistepScheduler", 10, 4),
    case("deis", "DEISMultistepScheduler", 20, 8, solver_order=3),
]  # fmt: skip


@pytest.mark.parametrize("name,cls,steps,start,config,options", DETERMINISTIC)
def test_img2img_matches_diffusers(name, cls, steps, start, config, options):
    x0, noise = _inputs()
    ref = _reference(cls, config, options)
    model = _model(tuple(config.items()), options.get("prediction_type", "epsilon"))
    want = diffusers_img2img(ref, model, x0, noise, steps, start)
    got = ours(name, config, steps, start, x0, noise, options)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


# Stochastic samplers: diffusers' randn_tensor replays our draws. Indices of our draws that
# diffusers consumes, for N steps from step k: fold_in(rng, i) draws (k-diffusion / LCM), or one
# key split per step run (`_vp.run_plan`, DDIM, DDPM) in the scheduler module SPLIT names.
SPLIT = {
    "dpm_solver_multistep": "scheduling_dpmsolver_multistep",
    "ddim": "scheduling_ddim",
    "ddpm": "scheduling_ddpm",
}
FOLD_IN = {
    "euler_ancestral": ("scheduling_euler_ancestral_discrete", lambda n, k: range(k, n)),
    "dpm2_ancestral": ("scheduling_k_dpm_2_ancestral_discrete", lambda n, k: range(2 * k + 1, 2 * n - 2, 2)),
    "lcm": ("scheduling_lcm", lambda n, k: range(k, n - 1)),
}  # fmt: skip


@pytest.mark.parametrize(
    "name,cls,steps,start,config,options",
    [
        case("euler_ancestral", "EulerAncestralDiscreteScheduler", 10, 4),
        case("dpm2_ancestral", "KDPM2AncestralDiscreteScheduler", 8, 3),
        case("lcm", "LCMScheduler", 6, 2),
        case(
            "dpm_solver_multistep", "DPMSolverMultistepScheduler", 10, 3,
            algorithm_type="sde-dpmsolver++",
        ),
        case("ddim", "DDIMScheduler", 10, 3, eta=1.0, steps_offset=1, clip_sample=False),
        case(
            "ddim", "DDIMScheduler", 12, 5, eta=0.5, prediction_type="v_prediction",
            set_alpha_to_one=False, clip_sample=False,
        ),
        # steps_offset=1: every kept t > 0, where DDPMScheduler draws (its last step's variance
        # is clamped to 1e-20, ours is 0: a 1e-10 difference).
        case("ddpm", "DDPMScheduler", 10, 4, steps_offset=1, clip_sample=False),
        case("ddpm", "DDPMScheduler", 20, 12, LINEAR, steps_offset=1, clip_sample=False),
    ],
)  # fmt: skip
def test_stochastic_img2img_matches_diffusers_with_shared_noise(
    monkeypatch, name, cls, steps, start, config, options
):
    key = jax.random.key(5)
    if name in FOLD_IN:
        module, indices = FOLD_IN[name]
        draws = [
            jax.random.normal(jax.random.fold_in(key, i), (BATCH, 2)) for i in indices(steps, start)
        ]
    else:
        module, draws, k = SPLIT[name], [], key
        for _ in range(steps - start):
            k, sub = jax.random.split(k)
            draws.append(jax.random.normal(sub, (BATCH, 2)))
    pending = iter([torch.from_numpy(np.asarray(d)) for d in draws])
    mod = importlib.import_module(f"diffusers.schedulers.{module}")
    monkeypatch.setattr(mod, "randn_tensor", lambda *a, **k: next(pending))
    x0, noise = _inputs(1)
    model = _model(tuple(config.items()), options.get("prediction_type", "epsilon"))
    step_kwargs = {k: v for k, v in options.items() if k in STEP_OPTIONS}
    ref = _reference(cls, config, options)
    want = diffusers_img2img(ref, model, x0, noise, steps, start, **step_kwargs)
    assert next(pending, None) is None  # diffusers used exactly the draws we replayed
    got = ours(name, config, steps, start, x0, noise, options, key)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)  # fmt: skip


# --- LMS and PNDM/PLMS: diffusers' arithmetic, restarted at the first kept step. ---------------


class RestartedLMS(diffusers.LMSDiscreteScheduler):
    """diffusers' LMS whose order counts the derivatives it has (its own counts from step 0 of the
    whole schedule, so after truncation it weights 1-3 derivatives with a 4-node rule)."""

    def get_lms_coefficient(self, order, t, current_order):
        return super().get_lms_coefficient(min(order, len(self.derivatives)), t, current_order)


def _restarted_pndm_timesteps(ref, steps, start):
    """PNDMScheduler.set_timesteps' call pattern built on the N - k lowest of its N timesteps
    (the step ratio stays T // N, as `step_plms` / `step_prk` read it)."""
    kept = ref._timesteps[: steps - start]
    if ref.config.skip_prk_steps:
        calls = np.concatenate([kept[:-1], kept[-2:-1], kept[-1:]])[::-1]
        return torch.from_numpy(calls.copy())
    half = ref.config.num_train_timesteps // steps // 2
    prk = np.array(kept[-4:]).repeat(2) + np.tile(np.array([0, half]), 4)
    ref.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
    ref.plms_timesteps = kept[:-3][::-1].copy()
    return torch.from_numpy(np.concatenate([ref.prk_timesteps, ref.plms_timesteps]))


@pytest.mark.parametrize(
    "name,steps,start,config,options",
    [
        ("lms", 10, 3, SD, {}),
        ("lms", 12, 5, LINEAR, dict(use_karras_sigmas=True, prediction_type="v_prediction")),
        ("plms", 10, 3, SD, dict(timestep_spacing="leading", steps_offset=1)),
        ("plms", 10, 1, SD, {}),
        ("plms", 25, 9, LINEAR, dict(prediction_type="v_prediction", set_alpha_to_one=True)),
        ("pndm", 12, 4, SD, dict(timestep_spacing="leading", steps_offset=1)),
        ("pndm", 10, 6, SD, {}),
    ],
)
def test_restarting_img2img_matches_diffusers_arithmetic(name, steps, start, config, options):
    x0, noise = _inputs(2)
    model = _model(tuple(config.items()), options.get("prediction_type", "epsilon"))
    if name == "lms":
        ref = _reference("LMSDiscreteScheduler", config, options)
        ref.__class__ = RestartedLMS
        want = diffusers_img2img(ref, model, x0, noise, steps, start)
    else:
        ref = _reference("PNDMScheduler", config, dict(options, skip_prk_steps=name == "plms"))
        ref.set_timesteps(steps)
        calls = _restarted_pndm_timesteps(ref, steps, start)
        ref.set_timesteps = lambda n: None  # keep the restarted pattern
        want = diffusers_img2img(ref, model, x0, noise, steps, start, timesteps=calls)
    got = ours(name, config, steps, start, x0, noise, options)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


# --- Every sampler ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", samplers.sampler_names())
def test_every_sampler_takes_img2img_options(name):
    """start_step = 0 without init_latents is text-to-image; img2img from step 5 of 10 lands near
    the data (the exact denoiser from a half-noised image), and bad options are named."""
    config = tuple(SD.items())
    schedule, model = _schedule(config), _model(config, "epsilon")
    fn = samplers.get_sampler(name)
    x0, noise = _inputs(3)
    key = jax.random.key(0)
    plain = fn(model, jnp.asarray(noise), schedule, 10, key)
    same = fn(model, jnp.asarray(noise), schedule, 10, key, start_step=0, init_latents=None)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(plain))
    out = np.asarray(
        fn(model, jnp.asarray(noise), schedule, 10, key, start_step=5, init_latents=x0)
    )
    assert np.all(np.isfinite(out))
    # Every point ends near a mixture mean: within 4 of the widest component's std (0.4) of one of
    # the means on a ring of radius 2. A wrong noise level (e.g. VP scaling in a sigma-space
    # sampler, sigma ~ 15 at t = 999) or a skipped start leaves points far outside.
    d = np.linalg.norm(out[:, None] - np.asarray(GMM.means)[None], axis=-1)
    assert np.all(d.min(1) < 4 * float(np.max(GMM.stds)) + 0.1), name
    # ... and the init latents are used: the run stays nearer to them than text-to-image from
    # the same noise (measured: mean distance 1.07-1.86 vs 2.31-2.51 over all samplers, the SDE
    # ones the least near; bound 0.85x).
    near = lambda a: float(np.mean(np.linalg.norm(a - x0, axis=-1)))
    assert near(out) < 0.85 * near(np.asarray(plain)), (name, near(out), near(np.asarray(plain)))
    for bad, message in [
        (dict(start_step=10, init_latents=x0), "start_step must be in"),
        (dict(start_step=3), "needs init_latents"),
        (dict(start_step=3, init_latents=x0[:4]), "init_latents must have"),
        (dict(start_step=2.0, init_latents=x0), "start_step must be an int"),
    ]:
        with pytest.raises(ValueError, match=message):
            fn(model, jnp.asarray(noise), schedule, 10, key, **bad)


def test_pndm_needs_four_kept_steps_for_its_warm_up():
    config = tuple(SD.items())
    x0, noise = _inputs()
    with pytest.raises(
        ValueError, match=r"needs >= 4 steps to run, got 3 \(num_steps 10, start_step 7"
    ):
        samplers.get_sampler("pndm")(
            _model(config, "epsilon"), jnp.asarray(noise), _schedule(config), 10,
            start_step=7, init_latents=x0,
        )  # fmt: skip


def _exact_img2img(config, x0, noise, sigma):
    """The probability-flow ODE's answer from alpha x0 + sigma alpha noise (VP, alpha =
    1 / sqrt(1 + sigma^2)): 400 DPM-Solver++(3M) steps on explicit sigmas from sigma down to the
    training minimum (an independent solution, converged far below the errors compared here)."""
    schedule, model = _schedule(config), _model(config, "epsilon")
    acp = np.asarray(schedule.alphas_cumprod, np.float64)
    fine = np.exp(np.linspace(np.log(sigma), np.log(np.sqrt((1 - acp[0]) / acp[0])), 400))
    alpha = 1 / np.sqrt(1 + sigma**2)
    start = jnp.asarray(alpha * x0 + sigma * alpha * noise, jnp.float32)
    run = samplers.get_sampler("dpm_solver_multistep")
    return np.asarray(run(model, start, schedule, 400, sigmas=fine, solver_order=3))


@pytest.mark.parametrize("name,start", [("lms", 20), ("plms", 35)])
def test_consistent_img2img_beats_diffusers_truncation(name, start):
    """50 steps from step k: each run's error to the converged ODE solution from its own noised
    start. Measured (2026-12-03): LMS k=20 rms 0.0096 ours vs 0.0364 diffusers, PLMS k=35
    0.0047 vs 0.0221 (at N=10-20 the ratios are 1.0-1.5): the restarted warm-up is the
    better integrator, which is why these two do not copy diffusers' truncation."""
    config, steps = tuple(SD.items()), 50
    x0, noise = _inputs(4)
    model = _model(config, "epsilon")
    if name == "lms":
        ref = diffusers.LMSDiscreteScheduler(**SD)
        ref.set_timesteps(steps)
        sigma_theirs = sigma_ours = float(ref.sigmas[start])
    else:
        ref = diffusers.PNDMScheduler(**SD, skip_prk_steps=True)
        ref.set_timesteps(steps)
        acp = ref.alphas_cumprod.numpy().astype(np.float64)
        # diffusers starts at timesteps[k] (PLMS' repeated second timestep shifts it one step
        # up for k >= 2); ours at the highest of the N - k kept timesteps, as DDIM does.
        t_theirs, t_ours = int(ref.timesteps[start]), int(ref._timesteps[steps - start - 1])
        sigma_theirs, sigma_ours = (
            float(np.sqrt((1 - acp[t]) / acp[t])) for t in (t_theirs, t_ours)
        )
    theirs = diffusers_img2img(ref, model, x0, noise, steps, start)
    mine = ours(name, dict(config), steps, start, x0, noise, {})
    rms = lambda a, b: float(np.sqrt(np.mean((a - b) ** 2)))
    err_ours = rms(mine, _exact_img2img(config, x0, noise, sigma_ours))
    err_theirs = rms(theirs, _exact_img2img(config, x0, noise, sigma_theirs))
    assert err_ours < 0.5 * err_theirs, (err_ours, err_theirs)


@pytest.mark.parametrize("name, order", [("ddim", 1), ("euler", 1), ("heun", 2), ("dpm2", 2)])
def test_stopping_and_resuming_is_the_uninterrupted_run(name, order):
    """The handoff options (`end_step`, then `start_step` with `add_noise=False`) on one model:
    a run stopped after step k and resumed from its latents is the uninterrupted run, for the
    samplers without a history (the SDXL base + refiner parity is in tests/test_generate.py)."""
    schedule = _schedule(tuple(SD.items()))
    model_fn = _model(tuple(SD.items()), "epsilon")
    noise = jax.random.normal(jax.random.key(3), (BATCH, 2))
    sample = samplers.get_sampler(name)
    steps, k = 8, 3
    run = lambda **o: sample(model_fn, noise, schedule, steps, jax.random.key(0), **o)
    full = run()
    part = run(end_step=k * order)  # for two-stage samplers: after the second stage of step k
    resumed = run(start_step=k, init_latents=part, add_noise=False)
    np.testing.assert_allclose(np.asarray(resumed), np.asarray(full), atol=1e-5)
    assert not np.allclose(np.asarray(part), np.asarray(full), atol=1e-2)  # it did stop early
    with pytest.raises(ValueError, match="end_step must be in"):
        run(end_step=0)
    with pytest.raises(ValueError, match="add_noise=False needs init_latents"):
        run(add_noise=False)
