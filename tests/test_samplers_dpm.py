"""DPM-Solver(++), UniPC and DEIS against diffusers' PyTorch schedulers.

Both sides are driven by the same closed-form model -- the exact denoiser of a Gaussian mixture
(`gaussian_mixture.exact_model_fn`), a perfect network -- from the same initial noise; diffusers'
side runs its `set_timesteps` / `scale_model_input` / `step` loop, ours one jitted call. The final
samples must agree to 1e-4 (float32). Our schedule is built from the diffusers scheduler's own
float32 `alphas_cumprod`, so both see identical noise levels and the test measures the samplers
(tests/test_diffusion.py checks the schedules themselves). SDE variants are checked twice: exact
parity with diffusers when both use the same per-step noise, and distributionally (sliced
Wasserstein distance to exact data samples, at the level of two independent exact samples).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import samplers, schedules
from ldm_jax.diffusion.gaussian_mixture import default_mixture, exact_model_fn, sliced_wasserstein

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
LINEAR = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
COSINE = dict(beta_schedule="squaredcos_cap_v2")
SHAPE = (64, 2, 2)  # 64 points of the 4-dim mixture (2-D spatial shape for thresholding)
GMM = default_mixture(4)
ATOL = 1e-4

MULTI = ("dpm_solver_multistep", "DPMSolverMultistepScheduler")
SINGLE = ("dpm_solver_singlestep", "DPMSolverSinglestepScheduler")
UNIPC = ("unipc", "UniPCMultistepScheduler")
DEIS = ("deis", "DEISMultistepScheduler")


@functools.cache
def _model(schedule_key, prediction_type):
    schedule = _schedule(schedule_key)
    return jax.jit(exact_model_fn(GMM, schedule, prediction_type))


@functools.cache
def _schedule(schedule_key):
    ref = diffusers.DDPMScheduler(**dict(schedule_key))
    return schedules.NoiseSchedule(alphas_cumprod=jnp.asarray(ref.alphas_cumprod.numpy()))


def _noise(seed=0):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def _run_diffusers(cls_name, schedule_cfg, options, steps, model_fn, noise):
    ref = getattr(diffusers, cls_name)(**schedule_cfg, **options)
    ref.set_timesteps(steps)
    # Start at index 0: diffusers otherwise finds the first step's index by its timestep, which
    # is ambiguous when timesteps repeat (Karras sigmas on the cosine schedule).
    ref.set_begin_index(0)
    x = torch.from_numpy(noise) * ref.init_noise_sigma
    for t in ref.timesteps:
        inp = ref.scale_model_input(x, t)
        out = model_fn(jnp.asarray(inp.numpy()), jnp.full((SHAPE[0],), float(t), jnp.float32))
        x = ref.step(torch.from_numpy(np.array(out)), t, x).prev_sample
    return x.numpy()


def _run_diffusers_timesteps(cls_name, schedule_cfg, options, timesteps, model_fn, noise):
    """diffusers' loop with custom timesteps (`set_timesteps(timesteps=...)`)."""
    ref = getattr(diffusers, cls_name)(**schedule_cfg, **options)
    ref.set_timesteps(timesteps=list(timesteps))
    x = torch.from_numpy(noise) * ref.init_noise_sigma
    for t in ref.timesteps:
        out = model_fn(jnp.asarray(x.numpy()), jnp.full((SHAPE[0],), float(t), jnp.float32))
        x = ref.step(torch.from_numpy(np.array(out)), t, x).prev_sample
    return x.numpy()


def _run_ours(name, schedule, steps, model_fn, noise, options, rng=None):
    sampler = samplers.get_sampler(name)
    fn = jax.jit(lambda n, key: sampler(model_fn, n, schedule, steps, key, **options))
    return np.asarray(fn(jnp.asarray(noise), rng))


# (sampler, schedule, steps, options incl. prediction_type): a lean cover of orders 1-3, both
# algorithm families, solver types, Karras / exponential / beta / lu sigmas, spacings, and the
# final-step rules (lower_order_final, euler_at_final, final_sigmas_type).
CASES = [
    (MULTI, SD, 10, dict(solver_order=2)),
    (MULTI, SD, 20, dict(solver_order=3, use_karras_sigmas=True, prediction_type="v_prediction")),
    (MULTI, SD, 5, dict(solver_order=1, timestep_spacing="leading", steps_offset=1)),
    (
        MULTI,
        SD,
        10,
        dict(solver_order=3, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
    ),
    (
        MULTI,
        LINEAR,
        20,
        dict(solver_order=2, solver_type="heun", lower_order_final=False, prediction_type="sample"),
    ),
    (
        MULTI,
        LINEAR,
        10,
        dict(
            algorithm_type="dpmsolver",
            solver_type="heun",
            final_sigmas_type="sigma_min",
            prediction_type="v_prediction",
            timestep_spacing="trailing",
        ),
    ),
    (MULTI, SD, 10, dict(solver_order=2, use_exponential_sigmas=True, euler_at_final=True)),
    (MULTI, SD, 10, dict(solver_order=3, use_lu_lambdas=True, prediction_type="v_prediction")),
    (MULTI, SD, 10, dict(use_beta_sigmas=True)),
    # The cosine schedule: lambda_min_clipped drops the noisiest timesteps; Karras timesteps are
    # truncated, not rounded (diffusers keys that on beta_schedule), giving 998 four times.
    (MULTI, COSINE, 10, dict(solver_order=3, lambda_min_clipped=-5.1)),
    (MULTI, COSINE, 10, dict(use_karras_sigmas=True, beta_schedule="squaredcos_cap_v2")),
    (MULTI, SD, 10, dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)),
    (SINGLE, SD, 10, dict(solver_order=2)),
    (SINGLE, SD, 9, dict(solver_order=3, use_karras_sigmas=True, prediction_type="v_prediction")),
    (
        SINGLE,
        LINEAR,
        12,
        dict(
            solver_order=3,
            algorithm_type="dpmsolver",
            solver_type="heun",
            final_sigmas_type="sigma_min",
        ),
    ),
    (SINGLE, LINEAR, 10, dict(solver_order=2, solver_type="heun", prediction_type="sample")),
    (SINGLE, SD, 5, dict(solver_order=1, use_exponential_sigmas=True)),
    (UNIPC, SD, 10, dict(solver_order=2)),
    (UNIPC, SD, 20, dict(solver_order=3, use_karras_sigmas=True, prediction_type="v_prediction")),
    (UNIPC, SD, 5, dict(solver_order=1, timestep_spacing="trailing")),
    (
        UNIPC,
        LINEAR,
        10,
        dict(solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min", predict_x0=False),
    ),
    (
        UNIPC,
        LINEAR,
        20,
        dict(
            solver_order=3,
            lower_order_final=False,
            final_sigmas_type="sigma_min",  # a 3rd-order step to sigma 0 is singular in diffusers
            disable_corrector=[0, 3],
            prediction_type="sample",
            timestep_spacing="leading",
            steps_offset=1,
        ),
    ),
    (UNIPC, SD, 10, dict(use_exponential_sigmas=True, final_sigmas_type="sigma_min")),
    (DEIS, SD, 10, dict(solver_order=2)),
    (DEIS, SD, 20, dict(solver_order=3, use_karras_sigmas=True, prediction_type="v_prediction")),
    (DEIS, LINEAR, 5, dict(solver_order=1, prediction_type="sample")),
    (
        DEIS,
        LINEAR,
        10,
        dict(solver_order=3, use_exponential_sigmas=True, timestep_spacing="leading"),
    ),
    (DEIS, SD, 10, dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)),
]


def _case_id(case):
    (name, _), cfg, steps, opts = case
    return "-".join(
        [name, cfg["beta_schedule"], str(steps)] + [f"{k}={v}" for k, v in opts.items()]
    )


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_diffusers(case):
    (name, cls_name), schedule_cfg, steps, options = case
    prediction_type = options.get("prediction_type", "epsilon")
    key = tuple(schedule_cfg.items())
    model_fn = _model(key, prediction_type)
    noise = _noise()
    # beta_schedule is one of our options only for the cosine quirk; diffusers gets it anyway.
    ref_options = {k: v for k, v in options.items() if k != "beta_schedule"}
    want = _run_diffusers(cls_name, schedule_cfg, ref_options, steps, model_fn, noise)
    got = _run_ours(name, _schedule(key), steps, model_fn, noise, options)
    assert np.isfinite(want).all()
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "name,cls_name,options",
    [
        (*MULTI, dict(algorithm_type="dpmsolver++")),
        (*UNIPC, dict()),
    ],
)
def test_zero_terminal_snr_matches_diffusers(name, cls_name, options):
    """A zero-terminal-SNR schedule (alphas_cumprod[-1] = 0, Lin et al. 2024) with trailing
    timesteps: the first step starts at infinite noise, which diffusers' schedulers replace by
    alphas_cumprod = 2**-24; v-prediction, as such models use."""
    schedule = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012, True)
    model_fn = jax.jit(exact_model_fn(GMM, schedule, "v_prediction"))
    options = dict(options, prediction_type="v_prediction", timestep_spacing="trailing")
    cfg = dict(SD, rescale_betas_zero_snr=True)
    noise = _noise(1)
    want = _run_diffusers(cls_name, cfg, options, 10, model_fn, noise)
    got = _run_ours(name, schedule, 10, model_fn, noise, options)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def _step_draws(key, steps):
    """Our samplers' per-step noise: a split of the key per step, as `_vp.run_plan` does."""
    draws = []
    for _ in range(steps):
        key, sub = jax.random.split(key)
        draws.append(torch.from_numpy(np.asarray(jax.random.normal(sub, SHAPE))))
    return draws


@pytest.mark.parametrize(
    "name,cls_name,module,options",
    [
        (*MULTI, "scheduling_dpmsolver_multistep", dict(algorithm_type="sde-dpmsolver++")),
        (
            *MULTI,
            "scheduling_dpmsolver_multistep",
            dict(
                algorithm_type="sde-dpmsolver++",
                solver_order=3,
                use_karras_sigmas=True,
                prediction_type="v_prediction",
            ),
        ),
        (
            *MULTI,
            "scheduling_dpmsolver_multistep",
            dict(
                algorithm_type="sde-dpmsolver",
                solver_type="heun",
                final_sigmas_type="sigma_min",
            ),
        ),
        (
            *SINGLE,
            "scheduling_dpmsolver_singlestep",
            dict(algorithm_type="sde-dpmsolver++", solver_order=2),
        ),
    ],
)
def test_sde_matches_diffusers_with_shared_noise(monkeypatch, name, cls_name, module, options):
    """SDE-DPM-Solver(++) against diffusers with diffusers' randn_tensor replaying our draws."""
    import importlib

    steps = 10
    key = tuple(SD.items())
    prediction_type = options.get("prediction_type", "epsilon")
    model_fn = _model(key, prediction_type)
    noise = _noise(2)
    pending = iter(_step_draws(jax.random.key(3), steps))
    mod = importlib.import_module(f"diffusers.schedulers.{module}")
    monkeypatch.setattr(mod, "randn_tensor", lambda *a, **k: next(pending))
    want = _run_diffusers(cls_name, SD, options, steps, model_fn, noise)
    got = _run_ours(name, _schedule(key), steps, model_fn, noise, options, jax.random.key(3))
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_sde_samplers_reach_the_data_distribution(name):
    """With many steps the SDE samplers' output is distributed as the data: its sliced
    Wasserstein distance to exact samples is at the level between two independent exact sample
    sets (the sampling floor, 0.035 here; both samplers reach about 0.045), and far below the
    distance of the initial noise. diffusers' own third-order SDE step fails this (0.33 at 50
    steps, 1.0 at 100), hence `dpmpp_3m_sde`'s corrected D2 coefficient."""
    n, steps = 2048, 50
    schedule = _schedule(tuple(SD.items()))
    model_fn = exact_model_fn(GMM, schedule)
    k_noise, k_run, k_a, k_b, k_sw = jax.random.split(jax.random.key(0), 5)
    noise = jax.random.normal(k_noise, (n, 4))
    sampler = samplers.get_sampler(name)
    x = jax.jit(lambda z, k: sampler(model_fn, z, schedule, steps, k))(noise, k_run)
    exact_a, exact_b = GMM.sample(k_a, n), GMM.sample(k_b, n)
    floor = float(sliced_wasserstein(k_sw, exact_a, exact_b))
    dist = float(sliced_wasserstein(k_sw, x, exact_a))
    far = float(sliced_wasserstein(k_sw, noise, exact_a))
    assert dist < 2.0 * floor + 0.01, (dist, floor)
    assert far > 5 * dist


def test_aliases_are_their_options():
    """Each alias is its base sampler with fixed options; fixed options cannot be overridden."""
    key = tuple(SD.items())
    schedule, model_fn, noise = _schedule(key), _model(key, "epsilon"), jnp.asarray(_noise())
    for alias, base, options in [
        ("dpmpp_2m", "dpm_solver_multistep", dict(algorithm_type="dpmsolver++", solver_order=2)),
        ("dpmpp_3m", "dpm_solver_multistep", dict(algorithm_type="dpmsolver++", solver_order=3)),
        ("dpmpp_2s", "dpm_solver_singlestep", dict(algorithm_type="dpmsolver++", solver_order=2)),
        (
            "dpm_solver",
            "dpm_solver_multistep",
            dict(algorithm_type="dpmsolver", solver_order=2, final_sigmas_type="sigma_min"),
        ),
        (
            "dpm_solver_3s",
            "dpm_solver_singlestep",
            dict(algorithm_type="dpmsolver", solver_order=3, final_sigmas_type="sigma_min"),
        ),
    ]:
        a = samplers.get_sampler(alias)(model_fn, noise, schedule, 6, use_karras_sigmas=True)
        b = samplers.get_sampler(base)(
            model_fn, noise, schedule, 6, use_karras_sigmas=True, **options
        )
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=alias)
    with pytest.raises(TypeError, match="solver_order"):
        samplers.get_sampler("dpmpp_2m")(model_fn, noise, schedule, 6, solver_order=3)


def test_bad_options_are_named():
    key = tuple(SD.items())
    schedule, model_fn, noise = _schedule(key), _model(key, "epsilon"), jnp.asarray(_noise())
    for name in ["dpm_solver_multistep", "dpm_solver_singlestep", "unipc", "deis", "dpmpp_2m"]:
        with pytest.raises(TypeError, match="solver_oder"):
            samplers.get_sampler(name)(model_fn, noise, schedule, 5, solver_oder=2)
    with pytest.raises(ValueError, match="dpmsolver\\+\\+"):
        samplers.get_sampler("dpm_solver_multistep")(
            model_fn, noise, schedule, 5, algorithm_type="dpm"
        )
    with pytest.raises(ValueError, match="sigma_min"):  # noise prediction cannot end at sigma 0
        samplers.get_sampler("dpm_solver_multistep")(
            model_fn, noise, schedule, 5, algorithm_type="dpmsolver"
        )
    with pytest.raises(ValueError, match="bh2"):
        samplers.get_sampler("unipc")(model_fn, noise, schedule, 5, solver_type="bh3")
    with pytest.raises(ValueError, match="solver_order"):
        samplers.get_sampler("deis")(model_fn, noise, schedule, 5, solver_order=4)
    with pytest.raises(ValueError, match="rng"):
        samplers.get_sampler("dpmpp_2m_sde")(model_fn, noise, schedule, 5)
    for name in [
        "dpm_solver_multistep",
        "dpm_solver_singlestep",
        "dpmpp_2m",
        "dpmpp_3m",
        "dpmpp_2m_sde",
        "dpmpp_3m_sde",
        "dpmpp_2s",
        "dpm_solver",
        "dpm_solver_3s",
        "unipc",
        "deis",
    ]:
        assert name in samplers.sampler_names()


# diffusers' AysSchedules["StableDiffusionTimesteps"]: Align Your Steps' 10-step SD 1.5 schedule
# (Sabour et al. 2024), which diffusers runs as DPMSolverMultistep's custom timesteps.
AYS_SD_TIMESTEPS = (999, 850, 736, 645, 545, 455, 343, 233, 124, 24)


@pytest.mark.parametrize(
    "case,options",
    [
        (MULTI, dict(solver_order=2)),
        (MULTI, dict(solver_order=3, prediction_type="v_prediction")),
        (SINGLE, dict(solver_order=2)),
    ],
)
def test_explicit_sigmas_are_diffusers_custom_timesteps(case, options):
    """`sigmas` = training sigmas at some timesteps is diffusers' set_timesteps(timesteps=...)."""
    (name, cls_name), key = case, tuple(SD.items())
    schedule, model_fn = _schedule(key), _model(key, options.get("prediction_type", "epsilon"))
    noise = _noise()
    sig = schedules.sigmas_from_alphas_cumprod(schedule.alphas_cumprod)
    sigmas = tuple(float(sig[t]) for t in AYS_SD_TIMESTEPS)
    want = _run_diffusers_timesteps(cls_name, SD, options, AYS_SD_TIMESTEPS, model_fn, noise)
    got = _run_ours(name, schedule, 10, model_fn, noise, dict(options, sigmas=sigmas))
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["dpm_solver_multistep", "dpm_solver_singlestep", "unipc", "deis"])
def test_explicit_sigmas_reproduce_the_default_schedule_and_are_checked(name):
    """Passing a sampler's own default sigmas changes nothing; bad schedules are refused."""
    key = tuple(SD.items())
    schedule, model_fn, noise = _schedule(key), _model(key, "epsilon"), _noise()
    sig = schedules.sigmas_from_alphas_cumprod(np.asarray(schedule.alphas_cumprod, np.float32))
    ts = np.linspace(0, 999, 7).round()[::-1][:-1].astype(int)  # the default "linspace" spacing
    own = tuple(float(np.float32(sig[t])) for t in ts)
    want = _run_ours(name, schedule, 6, model_fn, noise, {})
    got = _run_ours(name, schedule, 6, model_fn, noise, dict(sigmas=own))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    sampler = samplers.get_sampler(name)
    for bad in [own[:-1], own[::-1], (20.0,) + own[1:], own[:-1] + (0.01,)]:
        with pytest.raises(ValueError, match="decreasing values in the training range"):
            sampler(model_fn, jnp.asarray(noise), schedule, 6, sigmas=bad)
    with pytest.raises(ValueError, match="not both"):
        sampler(model_fn, jnp.asarray(noise), schedule, 6, sigmas=own, use_karras_sigmas=True)
