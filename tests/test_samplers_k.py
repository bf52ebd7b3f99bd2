"""Sigma-space samplers, PNDM/PLMS and LCM against diffusers' schedulers, and scheduler_config import.

Every deterministic sampler and its diffusers scheduler (set_timesteps, init_noise_sigma,
scale_model_input, step) are driven by the same closed-form network: the exact denoiser of a
Gaussian mixture (`gaussian_mixture.exact_model_fn`), called at the scheduler's timestep exactly as
diffusers gives it. Final samples must agree to 1e-4 (float32). Stochastic samplers get diffusers'
noise replaced by ours where diffusers draws it with `randn_tensor`, and must then agree as well;
with many steps they must also reach the data distribution.
"""

import functools
import importlib
import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import samplers, schedules
from ldm_jax.diffusion.gaussian_mixture import default_mixture, exact_model_fn, sliced_wasserstein

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

GMM = default_mixture(2)
SD = ("scaled_linear", 0.00085, 0.012)
LIN = ("linear", 0.0001, 0.02)
COS = ("squaredcos_cap_v2", 0.0001, 0.02)
BATCH = 64


@functools.cache
def setup(sched, prediction_type):
    """(schedule, jitted exact network) for a (beta_schedule, start, end) triple."""
    schedule = schedules.make_schedule(sched[0], 1000, sched[1], sched[2])
    return schedule, jax.jit(exact_model_fn(GMM, schedule, prediction_type))


def initial_noise(seed=0):
    return np.random.default_rng(seed).standard_normal((BATCH, 2)).astype(np.float32)


def reference(ref, model, noise, steps):
    """diffusers' denoising loop (as its pipelines run it) -> final sample as numpy."""
    ref.set_timesteps(steps)
    x = torch.from_numpy(noise) * ref.init_noise_sigma
    for t in ref.timesteps:
        inp = ref.scale_model_input(x, t)
        out = model(jnp.asarray(inp.numpy()), jnp.full((BATCH,), float(t), jnp.float32))
        x = ref.step(torch.from_numpy(np.asarray(out)), t, x).prev_sample
    return x.numpy()


def diffusers_scheduler(cls, sched, prediction_type, **config):
    return getattr(diffusers, cls)(
        beta_schedule=sched[0],
        beta_start=sched[1],
        beta_end=sched[2],
        prediction_type=prediction_type,
        **config,
    )


def run_ours(name, sched, prediction_type, steps, options, noise, rng=None):
    schedule, model = setup(sched, prediction_type)
    fn = samplers.get_sampler(name)
    sample = jax.jit(
        lambda n, key: fn(
            model, n, schedule, steps, key, prediction_type=prediction_type, **options
        )
    )
    return np.asarray(sample(jnp.asarray(noise), rng))


# Our sampler -> (diffusers class, its module, the indices of our noise draws diffusers consumes).
DIFFUSERS = {
    "euler": ("EulerDiscreteScheduler", None, None),
    "heun": ("HeunDiscreteScheduler", None, None),
    "lms": ("LMSDiscreteScheduler", None, None),
    "dpm2": ("KDPM2DiscreteScheduler", None, None),
    "pndm": ("PNDMScheduler", None, None),
    "plms": ("PNDMScheduler", None, None),
    "euler_ancestral": (
        "EulerAncestralDiscreteScheduler",
        "scheduling_euler_ancestral_discrete",
        lambda n: range(n),  # one per step (the last one multiplied by sigma_up = 0)
    ),
    "dpm2_ancestral": (
        "KDPM2AncestralDiscreteScheduler",
        "scheduling_k_dpm_2_ancestral_discrete",
        lambda n: range(1, 2 * n - 2, 2),  # at the second call of each of N - 1 two-call steps
    ),
    "lcm": ("LCMScheduler", "scheduling_lcm", lambda n: range(n - 1)),  # all steps but the last
}


def case(name, sched, prediction_type, steps, **options):
    """A parity case; options go to both samplers (PNDMScheduler also gets skip_prk_steps)."""
    label = f"{name}-{sched[0]}-{prediction_type}-{steps}-{'-'.join(options) or 'default'}"
    return pytest.param(name, sched, prediction_type, steps, options, id=label)


def diffusers_for(name, sched, prediction_type, options):
    extra = {"skip_prk_steps": name == "plms"} if name in ("pndm", "plms") else {}
    return diffusers_scheduler(DIFFUSERS[name][0], sched, prediction_type, **options, **extra)


@pytest.mark.parametrize(
    "name,sched,prediction_type,steps,options",
    [
        case("euler", SD, "epsilon", 10),
        case(
            "euler",
            SD,
            "v_prediction",
            8,
            use_karras_sigmas=True,
            timestep_spacing="leading",
            steps_offset=1,
        ),
        case("euler", LIN, "sample", 12, timestep_spacing="trailing"),
        case("euler", SD, "epsilon", 6, interpolation_type="log_linear"),
        case(
            "euler", COS, "epsilon", 9, use_exponential_sigmas=True, final_sigmas_type="sigma_min"
        ),
        case("euler", SD, "v_prediction", 7, use_beta_sigmas=True),
        case("heun", SD, "epsilon", 10),
        case("heun", SD, "v_prediction", 6, use_karras_sigmas=True),
        case("heun", COS, "sample", 8, timestep_spacing="leading", steps_offset=1),
        case("lms", SD, "epsilon", 10),
        case("lms", SD, "v_prediction", 12, use_karras_sigmas=True),
        case("lms", LIN, "sample", 12, timestep_spacing="trailing"),
        case("dpm2", SD, "epsilon", 10),
        case("dpm2", SD, "v_prediction", 7, use_karras_sigmas=True),
        case("dpm2", LIN, "epsilon", 8, timestep_spacing="leading", steps_offset=1),
        case("pndm", SD, "epsilon", 10, timestep_spacing="leading", steps_offset=1),
        case("pndm", LIN, "v_prediction", 20, timestep_spacing="linspace", set_alpha_to_one=True),
        case("plms", SD, "epsilon", 10, steps_offset=1),
        case("plms", SD, "v_prediction", 25, timestep_spacing="trailing"),
        case("plms", COS, "epsilon", 3),
    ],
)
def test_deterministic_samplers_match_diffusers(name, sched, prediction_type, steps, options):
    ref = diffusers_for(name, sched, prediction_type, options)
    noise = initial_noise()
    want = reference(ref, setup(sched, prediction_type)[1], noise, steps)
    got = run_ours(name, sched, prediction_type, steps, options, noise)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "name,sched,prediction_type,steps,options",
    [
        case("euler_ancestral", SD, "epsilon", 10),
        case(
            "euler_ancestral", LIN, "v_prediction", 12, timestep_spacing="leading", steps_offset=1
        ),
        case("dpm2_ancestral", SD, "epsilon", 8),
        case("dpm2_ancestral", SD, "v_prediction", 6, use_karras_sigmas=True),
        case("lcm", SD, "epsilon", 4),
        case("lcm", LIN, "v_prediction", 8, original_inference_steps=100),
    ],
)
def test_stochastic_samplers_match_diffusers_with_shared_noise(
    monkeypatch, name, sched, prediction_type, steps, options
):
    """diffusers' randn_tensor replaced by our draws: normal(fold_in(key, i)) for each i it uses."""
    _, module, indices = DIFFUSERS[name]
    ref = diffusers_for(name, sched, prediction_type, options)
    key = jax.random.key(3)
    draws = [jax.random.normal(jax.random.fold_in(key, i), (BATCH, 2)) for i in indices(steps)]
    pending = iter([torch.from_numpy(np.asarray(d)) for d in draws])
    mod = importlib.import_module(f"diffusers.schedulers.{module}")
    monkeypatch.setattr(mod, "randn_tensor", lambda *a, **k: next(pending))
    noise = initial_noise(1)
    want = reference(ref, setup(sched, prediction_type)[1], noise, steps)
    assert next(pending, None) is None  # diffusers used exactly the draws we replayed
    got = run_ours(name, sched, prediction_type, steps, options, noise, key)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "options",
    [
        dict(timestep_spacing="leading", steps_offset=1, use_karras_sigmas=True),
        dict(timestep_spacing="trailing", use_exponential_sigmas=True),
        dict(timestep_spacing="linspace", use_beta_sigmas=True, final_sigmas_type="sigma_min"),
        dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0),
        dict(interpolation_type="log_linear"),
    ],
)
def test_sigma_schedules_match_diffusers_euler(options):
    """Timesteps, sigmas and init_noise_sigma of EulerDiscreteScheduler.set_timesteps, and the
    zero-terminal-SNR schedule (whose abar = 0 diffusers replaces by 2**-24)."""
    for rescale in (False, True):
        ref = diffusers.EulerDiscreteScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            rescale_betas_zero_snr=rescale,
            **options,
        )
        ref.set_timesteps(13)
        schedule = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012, rescale)
        ts, sigmas = schedules.inference_sigmas(schedule, 13, **options)
        # diffusers builds the schedule in float32 (we in float64, then round): the timesteps of
        # the rescaled schedule's tiny abar differ by up to 2e-3 training steps.
        np.testing.assert_allclose(ts, ref.timesteps.numpy(), rtol=0, atol=5e-3)
        np.testing.assert_allclose(sigmas, ref.sigmas.numpy()[: len(sigmas)], rtol=5e-5)
        spacing = options.get("timestep_spacing", "linspace")
        np.testing.assert_allclose(
            schedules.init_noise_sigma(sigmas, spacing), float(ref.init_noise_sigma), rtol=2e-5
        )


def test_euler_continuous_timesteps_match_diffusers():
    """timestep_type="continuous" with v_prediction: the network gets t = log(sigma) / 4 (EDM's
    c_noise), so here an exact network that reads sigma = exp(4 t)."""

    def model(x_t, t):
        sigma = jnp.exp(4 * t)
        abar = 1 / (1 + sigma**2)
        x0 = GMM.x0_mean(x_t, abar)
        eps = (x_t - jnp.sqrt(abar)[:, None] * x0) / jnp.sqrt(1 - abar)[:, None]
        return jnp.sqrt(abar)[:, None] * eps - jnp.sqrt(1 - abar)[:, None] * x0

    model = jax.jit(model)
    options = dict(timestep_type="continuous", use_karras_sigmas=True)
    ref = diffusers_scheduler("EulerDiscreteScheduler", SD, "v_prediction", **options)
    noise = initial_noise(4)
    want = reference(ref, model, noise, 9)
    schedule = setup(SD, "v_prediction")[0]
    euler = samplers.get_sampler("euler")
    got = euler(model, noise, schedule, 9, prediction_type="v_prediction", **options)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_kdpm2_rounds_its_karras_timesteps():
    ref = diffusers.KDPM2DiscreteScheduler(beta_schedule="scaled_linear", use_karras_sigmas=True)
    ref.set_timesteps(6)
    schedule = schedules.make_schedule(*SD[:1], 1000, *SD[1:])
    ts, _ = schedules.inference_sigmas(
        schedule, 6, use_karras_sigmas=True, round_karras_timesteps=True
    )
    np.testing.assert_array_equal(ts, ref.timesteps.numpy()[0::2])


def test_lcm_golden_timesteps():
    from ldm_jax.diffusion.samplers.lcm import lcm_timesteps

    np.testing.assert_array_equal(lcm_timesteps(4), [999, 759, 499, 259])
    for steps, orig in [(1, 50), (7, 50), (50, 50), (8, 100)]:
        ref = diffusers.LCMScheduler(original_inference_steps=orig)
        ref.set_timesteps(steps)
        np.testing.assert_array_equal(lcm_timesteps(steps, 1000, orig), ref.timesteps.numpy())


# --- Distributions: stochastic samplers with many steps reach the data. ---

N_POINTS = 4096


def region_stats(x):
    """Per mixture component (nearest mean): fraction of points, mean and std of those points."""
    means = np.asarray(GMM.means)
    label = np.argmin(((x[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    frac = np.array([(label == k).mean() for k in range(len(means))])
    mu = np.array([x[label == k].mean(0) for k in range(len(means))])
    sd = np.array([x[label == k].std() for k in range(len(means))])
    return frac, mu, sd


@functools.cache
def true_region_stats():
    """region_stats of the data itself, from 2^18 exact samples (standard errors ~8x below ours)."""
    return region_stats(np.asarray(GMM.sample(jax.random.key(99), 2**18)))


def consistency_model_fn(schedule, inner_steps=40):
    """A perfect LCM network: its consistency function c_skip x_t + c_out F (LCMScheduler's
    scalings, "sample" prediction) is the probability-flow ODE's endpoint from (x_t, t), solved with
    `inner_steps` Heun steps (Karras sigmas down to 0.002) on the exact denoiser."""
    denoise = lambda x, s: GMM.x0_mean(x / jnp.sqrt(1 + s**2)[:, None], 1 / (1 + s**2))

    def model_fn(x_t, t):
        sigma_t = schedules.t_to_sigma(t, schedule)
        ramp = jnp.linspace(0, 1, inner_steps + 1)[:, None]
        lo, hi = 0.002 ** (1 / 7), sigma_t[None] ** (1 / 7)
        sig = jnp.concatenate([(hi + ramp * (lo - hi)) ** 7, jnp.zeros((1, t.shape[0]))])

        def heun(i, x):
            s, s_next = sig[i], sig[i + 1]
            d = (x - denoise(x, s)) / s[:, None]
            x_e = x + d * (s_next - s)[:, None]
            d2 = (x_e - denoise(x_e, jnp.maximum(s_next, 1e-6))) / jnp.maximum(s_next, 1e-6)[
                :, None
            ]
            return jnp.where(s_next[:, None] > 0, x + (d + d2) / 2 * (s_next - s)[:, None], x_e)

        x0 = jax.lax.fori_loop(0, inner_steps + 1, heun, x_t * jnp.sqrt(1 + sigma_t**2)[:, None])
        scaled = t * 10.0
        c_skip = 0.25 / (scaled**2 + 0.25)
        c_out = scaled / jnp.sqrt(scaled**2 + 0.25)
        return (x0 - c_skip[:, None] * x_t) / c_out[:, None]

    return model_fn


PAIRS = [(0, 1), (2, 3), (0, 2), (1, 3)]


@pytest.mark.parametrize(
    "name,steps,options",
    [
        ("euler_ancestral", 250, {}),
        ("dpm2_ancestral", 125, {}),
        ("dpmpp_sde", 125, dict(use_karras_sigmas=True)),
        ("euler", 250, dict(s_churn=10.0)),
        ("lcm", 4, dict(prediction_type="sample")),
        # DDPM and DDIM end with the x_0 estimate from their last timestep, which removes the
        # noise left there instead of sampling it: with 250 "leading" steps (last t = 4, sigma
        # 0.06) the narrowest component comes out 20% too narrow; with all 1000, t = 0.
        ("ddpm", 1000, {}),
        ("ddim", 1000, dict(eta=1.0)),
        ("ddim", 1000, dict(eta=0.5)),
    ],
)
def test_stochastic_samplers_reach_the_data_distribution(name, steps, options):
    schedule = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012)
    if name == "lcm":
        model = consistency_model_fn(schedule)
    else:
        model = exact_model_fn(GMM, schedule, options.get("prediction_type", "epsilon"))
    fn = samplers.get_sampler(name)
    k_noise, k_rng, k_sw, *k_refs = jax.random.split(jax.random.key(11), 7)
    noise = jax.random.normal(k_noise, (N_POINTS, 2))
    x = np.asarray(jax.jit(lambda n, k: fn(model, n, schedule, steps, k, **options))(noise, k_rng))
    # Sliced W2 to exact samples, against the same distance between exact samples (the floor set
    # by N_POINTS); both averaged over pairs, as one SW value is noisy.
    refs = [np.asarray(GMM.sample(k, N_POINTS)) for k in k_refs]
    floor = np.mean([float(sliced_wasserstein(k_sw, refs[a], refs[b])) for a, b in PAIRS])
    dist = np.mean([float(sliced_wasserstein(k_sw, x, r)) for r in refs])
    assert dist < 1.3 * floor, (dist, floor)
    # Per component region: weight, mean and std within 5 standard errors of the data's.
    (f, mu, sd), (f0, mu0, sd0) = region_stats(x), true_region_stats()
    n_k = N_POINTS * f0
    assert np.all(np.abs(f - f0) < 5 * np.sqrt(f0 * (1 - f0) / N_POINTS)), (f, f0)
    assert np.all(np.abs(mu - mu0) < 5 * (sd0 / np.sqrt(n_k))[:, None]), (mu, mu0)
    assert np.all(np.abs(sd / sd0 - 1) < 5 / np.sqrt(2 * n_k)), (sd, sd0)


# --- scheduler_config.json import. ---

# As in the published checkpoints' scheduler/scheduler_config.json (SD 1.5, SD 2.1-v, SDXL base).
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD21_V = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SDXL = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def sample_like_config(cfg, steps=10):
    """(ours, diffusers') final samples for a scheduler config, with the same noise and network."""
    name, options, schedule = schedules.sampler_from_scheduler_config(cfg)
    prediction_type = options.get("prediction_type", "epsilon")
    model = jax.jit(exact_model_fn(GMM, schedule, prediction_type))
    ref = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
    noise = initial_noise(2)
    want = reference(ref, model, noise, steps)
    fn = samplers.get_sampler(name)
    got = jax.jit(lambda n: fn(model, n, schedule, steps, jax.random.key(0), **options))(noise)
    return np.asarray(got), want


@pytest.mark.parametrize("cfg", [SD15, SDXL], ids=["sd15", "sdxl"])
def test_checkpoint_configs_sample_like_diffusers(cfg):
    got, want = sample_like_config(cfg)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_checkpoint_configs_map_to_samplers_and_options(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(SD15))
    assert schedules.sampler_from_scheduler_config(path)[:2] == (
        "plms",
        {"steps_offset": 1, "set_alpha_to_one": False},
    )
    assert schedules.sampler_from_scheduler_config(SDXL)[:2] == (
        "euler",
        {
            "prediction_type": "epsilon",
            "timestep_spacing": "leading",
            "steps_offset": 1,
            "use_karras_sigmas": False,
            "interpolation_type": "linear",
        },
    )
    assert schedules.sampler_from_scheduler_config(SD21_V)[:2] == (
        "ddim",
        {"prediction_type": "v_prediction", "steps_offset": 1, "set_alpha_to_one": False},
    )


def test_sd21_config_samples_like_diffusers():
    got, want = sample_like_config(SD21_V)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def default_config(cls):
    """A class's default config as diffusers writes it (to_json_string adds _class_name)."""
    if cls == "DPMSolverSDEScheduler":  # needs torchsde to instantiate: its defaults by hand
        return dict(
            _class_name=cls,
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="linear",
            trained_betas=None,
            prediction_type="epsilon",
            use_karras_sigmas=False,
            use_exponential_sigmas=False,
            use_beta_sigmas=False,
            noise_sampler_seed=None,
            timestep_spacing="linspace",
            steps_offset=0,
        )
    return json.loads(getattr(diffusers, cls)().to_json_string())


@pytest.mark.parametrize("cls", sorted(schedules.SCHEDULER_CLASSES))
def test_every_scheduler_class_imports(cls):
    """Each class's default config: the schedule is the class's own, the sampler exists and takes
    every option; a config with only _class_name means the class defaults."""
    cfg = default_config(cls)
    name, options, schedule = schedules.sampler_from_scheduler_config(cfg)
    assert name in samplers.sampler_names()
    params = inspect.signature(samplers.get_sampler(name)).parameters
    assert set(options) <= set(params), set(options) - set(params)
    bare = schedules.sampler_from_scheduler_config({"_class_name": cls})[2]
    if cls != "DPMSolverSDEScheduler":
        want = getattr(diffusers, cls)().alphas_cumprod.numpy()
        np.testing.assert_allclose(np.asarray(schedule.alphas_cumprod), want, rtol=1e-5)
    np.testing.assert_array_equal(bare.alphas_cumprod, schedule.alphas_cumprod)


def test_config_schedule_fields():
    betas = np.linspace(1e-3, 0.05, 100)
    cfg = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 100}
    _, _, schedule = schedules.sampler_from_scheduler_config({**cfg, "trained_betas": list(betas)})
    np.testing.assert_allclose(schedule.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-6)
    zsnr = {"beta_schedule": "scaled_linear", "rescale_betas_zero_snr": True}
    _, _, schedule = schedules.sampler_from_scheduler_config({**cfg, **zsnr})
    assert float(schedule.alphas_cumprod[-1]) == 0.0
    # Heun takes no rescale_betas_zero_snr: diffusers ignores it, so do we.
    _, _, schedule = schedules.sampler_from_scheduler_config(
        {**cfg, **zsnr, "_class_name": "HeunDiscreteScheduler"}
    )
    assert float(schedule.alphas_cumprod[-1]) > 0.0
    # DDIM clips x0 by default in diffusers: an old config without clip_sample asks for it.
    assert schedules.sampler_from_scheduler_config({"_class_name": "DDIMScheduler"})[1] == {
        "clip_sample": True
    }
    with pytest.raises(ValueError, match="EulerDiscreteScheduler"):
        schedules.sampler_from_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler"})


OURS = [
    "euler",
    "euler_ancestral",
    "heun",
    "lms",
    "dpm2",
    "dpm2_ancestral",
    "dpmpp_sde",
    "pndm",
    "plms",
    "lcm",
]


@pytest.mark.parametrize("name", OURS)
def test_samplers_take_the_shared_options_and_reject_unknown_ones(name):
    fn = samplers.get_sampler(name)
    params = inspect.signature(fn).parameters
    assert {"prediction_type", "timestep_spacing", "steps_offset"} <= set(params)
    schedule, model = setup(SD, "epsilon")
    with pytest.raises(TypeError, match="use_karras_sigma"):
        fn(model, jnp.zeros((2, 2)), schedule, 4, jax.random.key(0), use_karras_sigma=True)
