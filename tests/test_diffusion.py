"""Diffusion math against diffusers' schedulers (PyTorch) and closed-form Gaussian answers.

For data x_0 ~ N(mu, s^2) (per coordinate) the exact denoiser is known:
E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar),
so it stands in for a perfect network and the samplers' outputs can be checked exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import objectives, samplers, schedules
from ldm_jax.diffusion.guidance import classifier_free_guidance

MU, S = 0.7, 0.5


def gaussian_eps(x_t, abar):
    abar = jnp.reshape(abar, abar.shape + (1,) * (x_t.ndim - abar.ndim))
    return jnp.sqrt(1 - abar) * (x_t - jnp.sqrt(abar) * MU) / (abar * S**2 + 1 - abar)


def model_fn_for(schedule, prediction_type="epsilon"):
    """The exact network output for the Gaussian data, in `prediction_type`."""

    def model_fn(x_t, t):
        abar = schedule.alphas_cumprod[t.astype(jnp.int32)]
        eps = gaussian_eps(x_t, abar)
        a = abar.reshape(abar.shape + (1,) * (x_t.ndim - 1))
        x0 = (x_t - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
        return objectives.training_target(x0, eps, abar, prediction_type)

    return model_fn


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("linear", dict(beta_start=1e-4, beta_end=0.02)),
        ("scaled_linear", dict(beta_start=0.00085, beta_end=0.012)),
        ("squaredcos_cap_v2", {}),
        ("sigmoid", dict(beta_start=1e-4, beta_end=0.02)),
    ],
)
def test_betas_match_diffusers(name, kwargs):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=name, **kwargs)
    ours = schedules.make_schedule(
        name, 1000, kwargs.get("beta_start", 1e-4), kwargs.get("beta_end", 0.02)
    )
    np.testing.assert_allclose(
        np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=1e-6, atol=1e-7
    )


def test_zero_terminal_snr_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        rescale_betas_zero_snr=True,
    )
    ours = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012, True)
    np.testing.assert_allclose(
        np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-7
    )
    assert float(ours.alphas_cumprod[-1]) == 0.0


def test_ddim_golden_timesteps():
    # The worked example of diffusers' docs and of Lin et al. 2024, Table 2.
    np.testing.assert_array_equal(
        schedules.inference_timesteps(5, 1000, "leading", 1), [801, 601, 401, 201, 1]
    )


@pytest.mark.parametrize(
    "spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)]
)
@pytest.mark.parametrize("steps", [5, 25, 50])
def test_timesteps_match_diffusers(spacing, offset, steps):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(
        schedules.inference_timesteps(steps, 1000, spacing, offset), ref.timesteps.numpy()
    )


def test_bad_names_list_valid_ones():
    with pytest.raises(ValueError, match="scaled_linear"):
        schedules.make_betas("cosine-ish")
    with pytest.raises(ValueError, match="trailing"):
        schedules.inference_timesteps(10, 1000, "middle")
    with pytest.raises(ValueError, match="ddim"):
        samplers.get_sampler("nope")


# The issue's sampler list (Done means: all registered) by registry name.
ISSUE_SAMPLERS = {
    "deterministic": "ddim pndm plms euler heun lms dpm2 dpm_solver dpm_solver_3s "
    "dpm_solver_multistep dpm_solver_singlestep dpmpp_2m dpmpp_3m dpmpp_2s unipc deis",
    "stochastic": "ddpm euler_ancestral dpm2_ancestral dpmpp_2m_sde dpmpp_3m_sde dpmpp_sde lcm",
}


def test_every_sampler_is_registered_documented_and_runs_as_the_pipelines_call_it():
    """Every name runs through the one signature on image-shaped latents, as `pipeline.generate`
    and `ldm-jax sample --sampler NAME` call it, and has a docstring; an unknown name's error
    lists them all (what the CLI prints)."""
    names = samplers.sampler_names()
    assert set(" ".join(ISSUE_SAMPLERS.values()).split()) <= set(names)
    schedule = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012)
    noise = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    model_fn = model_fn_for(schedule)
    with jax.disable_jit():  # no compiles: the loops run in Python
        for name in names:
            fn = samplers.get_sampler(name)
            assert fn.__doc__ and len(fn.__doc__) > 40, name
            x = fn(model_fn, noise, schedule, 4, jax.random.key(1), prediction_type="epsilon")
            assert x.shape == noise.shape and bool(jnp.all(jnp.isfinite(x))), name
    with pytest.raises(ValueError) as err:
        samplers.get_sampler("euler-ish")
    assert f"unknown sampler 'euler-ish'; valid: {', '.join(names)}" in str(err.value)


@pytest.mark.parametrize("prediction_type", objectives.PREDICTION_TYPES)
def test_parameterizations_round_trip(prediction_type):
    k1, k2 = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(k1, (4, 3, 3, 2))
    eps = jax.random.normal(k2, x0.shape)
    abar = jnp.array([0.99, 0.5, 0.1, 0.004])
    x_t = objectives.add_noise(x0, eps, abar)
    out = objectives.training_target(x0, eps, abar, prediction_type)
    x0_hat, eps_hat = objectives.predict_x0_and_eps(out, x_t, abar, prediction_type)
    np.testing.assert_allclose(x0_hat, x0, atol=2e-4)
    np.testing.assert_allclose(eps_hat, eps, atol=2e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize(
    "spacing,offset,extra",
    [
        ("leading", 1, {}),
        ("trailing", 0, {}),
        # SD 2.x's DDIM config: abar_0 after the last step; pixel-space clipping of x_0.
        ("leading", 1, dict(set_alpha_to_one=False, clip_sample=True, clip_sample_range=0.8)),
    ],
)
def test_ddim_matches_diffusers(prediction_type, spacing, offset, extra):
    """DDIM (eta=0) and diffusers' DDIMScheduler, driven by the same exact model and noise."""
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    config = dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        timestep_spacing=spacing,
        steps_offset=offset,
        clip_sample=False,
        set_alpha_to_one=True,
    )
    config.update(extra)
    schedule = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012)
    noise = np.random.default_rng(0).standard_normal((4, 8, 8, 2)).astype(np.float32)
    model_fn = model_fn_for(schedule, prediction_type)

    ref = diffusers.DDIMScheduler(**config)
    ref.set_timesteps(10)
    x = torch.from_numpy(noise)
    for t in ref.timesteps:
        out = model_fn(jnp.asarray(x.numpy()), jnp.full((4,), float(t)))
        x = ref.step(torch.from_numpy(np.asarray(out)), t, x).prev_sample
    ours = jax.jit(
        lambda n: samplers.ddim(
            model_fn,
            n,
            schedule,
            10,
            prediction_type=prediction_type,
            timestep_spacing=spacing,
            steps_offset=offset,
            **extra,
        )
    )(noise)
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), atol=1e-4)


def test_ddpm_matches_diffusers_with_shared_noise(monkeypatch):
    """Ancestral DDPM against DDPMScheduler (fixed_small variance), the same step noise in both."""
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    from diffusers.schedulers import scheduling_ddpm

    schedule = schedules.make_schedule("linear", 1000, 1e-4, 0.02)
    ref = diffusers.DDPMScheduler(
        beta_schedule="linear", clip_sample=False, variance_type="fixed_small"
    )
    steps = 20
    ref.set_timesteps(steps)
    noise = np.random.default_rng(1).standard_normal((3, 4, 4, 2)).astype(np.float32)
    model_fn = model_fn_for(schedule)
    # Replay our sampler's per-step draws (split of the key, as in samplers.ddpm) into diffusers.
    draws, key = [], jax.random.key(7)
    for _ in range(steps):
        key, sub = jax.random.split(key)
        draws.append(torch.from_numpy(np.asarray(jax.random.normal(sub, noise.shape))))
    pending = iter(draws)
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: next(pending))
    x = torch.from_numpy(noise)
    for t in ref.timesteps:
        out = model_fn(jnp.asarray(x.numpy()), jnp.full((3,), float(t)))
        x = ref.step(torch.from_numpy(np.asarray(out)), t, x).prev_sample
    ours = samplers.ddpm(model_fn, jnp.asarray(noise), schedule, steps, jax.random.key(7))
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), atol=1e-4)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samplers_reach_the_data_distribution(sampler):
    """With the exact denoiser and every training timestep, samples have the data's mean and std.

    (With few steps both samplers shrink the variance -- DDIM 50 steps gives std 0.476 here -- which
    is discretization error, not a bug; the sampler benchmark of a later issue measures it.)"""
    steps = 1000
    schedule = schedules.make_schedule("linear", 1000, 1e-4, 0.02)
    noise = jax.random.normal(jax.random.key(0), (4096, 4))
    x = samplers.get_sampler(sampler)(
        model_fn_for(schedule), noise, schedule, steps, jax.random.key(1)
    )
    # 16384 draws: the standard error of the mean is S/128 = 0.004, of the std about 0.003.
    assert abs(float(x.mean()) - MU) < 0.02
    assert abs(float(x.std()) - S) < 0.02


def test_classifier_free_guidance_combines_one_batched_call():
    calls = []

    def apply_fn(x, t, context):
        calls.append(x.shape[0])
        return x * 0 + context[:, :1, :1]  # the output tells which context it saw

    cond = jnp.full((2, 3, 1), 5.0)
    uncond = jnp.full((2, 3, 1), 1.0)
    x = jnp.zeros((2, 1, 1))
    for w, want in [(0.0, 1.0), (1.0, 5.0), (4.0, 17.0)]:
        out = classifier_free_guidance(apply_fn, cond, uncond, w)(x, jnp.zeros(2))
        np.testing.assert_allclose(out, want)
    assert calls == [4, 4, 4]
    per_example = classifier_free_guidance(apply_fn, cond, uncond, jnp.array([0.0, 2.0]))
    np.testing.assert_allclose(per_example(x, jnp.zeros(2)).ravel(), [1.0, 9.0])


def test_min_snr_weights():
    """Min-SNR-gamma (Hang et al. 2023): the weight is min(SNR, gamma) in x0 space, whatever the
    network predicts. An eps error d is an x0 error d / sqrt(SNR); a v error d is an x0 error
    d / sqrt(SNR + 1). So weight * SNR (eps) and weight * (SNR + 1) (v) must be min(SNR, gamma)."""
    abar = jnp.array([0.999, 0.9, 0.5, 0.01])
    snr = abar / (1 - abar)
    want_x0 = jnp.minimum(snr, 5.0)
    np.testing.assert_allclose(
        objectives.loss_weight(abar, "epsilon", "min_snr") * snr, want_x0, rtol=1e-5
    )
    np.testing.assert_allclose(
        objectives.loss_weight(abar, "v_prediction", "min_snr") * (snr + 1), want_x0, rtol=1e-5
    )
    np.testing.assert_allclose(
        objectives.loss_weight(abar, "sample", "min_snr"), want_x0, rtol=1e-5
    )
    np.testing.assert_array_equal(objectives.loss_weight(abar, "epsilon"), jnp.ones(4))
    with pytest.raises(ValueError, match="min_snr"):
        objectives.loss_weight(abar, "epsilon", "p2")


def test_flat_normal_draw_equals_jax_random_normal():
    """ldm_jax.rng.normal (flat draw, reshaped: compiles ~8x faster on CPU) gives the values of
    jax.random.normal, also under vmap, so swapping it in changed no trained model."""
    from ldm_jax import rng

    key = jax.random.key(3)
    for shape in [(4, 8, 8, 4), (2, 3), (5,)]:
        np.testing.assert_array_equal(rng.normal(key, shape), jax.random.normal(key, shape))
    keys = jax.random.split(key, 3)
    np.testing.assert_array_equal(
        jax.vmap(lambda k: rng.normal(k, (4, 4, 2)))(keys),
        jax.vmap(lambda k: jax.random.normal(k, (4, 4, 2)))(keys),
    )


@pytest.mark.parametrize("weighting", objectives.LOSS_WEIGHTINGS)
@pytest.mark.parametrize("prediction_type", objectives.PREDICTION_TYPES)
def test_denoising_loss_of_the_exact_denoiser_of_a_point_mass(prediction_type, weighting):
    """Data that is one point c has an exact denoiser: from x_t, eps = (x_t - sqrt(abar) c) /
    sqrt(1 - abar). Its loss is 0 in every parameterization; an output off by delta everywhere
    costs mean(weight) delta^2, with the Min-SNR weights written out here (Hang et al. 2023)."""
    acp = schedules.make_schedule().alphas_cumprod
    rng = np.random.default_rng(0)
    c = rng.normal(size=(1, 4, 4, 2)).astype(np.float32)
    x0 = jnp.asarray(np.repeat(c, 6, axis=0))
    noise = jnp.asarray(rng.normal(size=x0.shape).astype(np.float32))
    t = jnp.asarray([0, 10, 200, 500, 800, 999])

    def exact(delta):
        def apply(x_t, t_float):
            a = acp[t_float.astype(jnp.int32)][:, None, None, None]
            eps = (x_t - jnp.sqrt(a) * c) / jnp.sqrt(1 - a)
            out = {"epsilon": eps, "sample": jnp.broadcast_to(c, x_t.shape)}
            out["v_prediction"] = jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * c
            return out[prediction_type] + delta

        return apply

    loss, aux = objectives.denoising_loss(exact(0.0), x0, noise, t, acp, prediction_type, weighting)
    assert float(loss) < 1e-5 and float(aux["mse"]) < 1e-5
    loss, aux = objectives.denoising_loss(exact(0.1), x0, noise, t, acp, prediction_type, weighting)
    a = np.asarray(acp, np.float64)[np.asarray(t)]
    snr = a / (1 - a)
    weight = np.ones_like(snr)
    if weighting == "min_snr":
        divisor = {"epsilon": snr, "v_prediction": snr + 1, "sample": np.ones_like(snr)}
        weight = np.minimum(snr, 5.0) / divisor[prediction_type]
    np.testing.assert_allclose(float(aux["mse"]), 0.01, rtol=2e-3)
    np.testing.assert_allclose(float(loss), weight.mean() * 0.01, rtol=2e-3)
