"""Guidance variants against diffusers (PyTorch) and their defining semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import schedules
from ldm_jax.diffusion.guidance import classifier_free_guidance

torch = pytest.importorskip("torch")


def _toy_apply(x, t, context):
    """A network whose cond and uncond outputs differ in scale and offset per example."""
    return x * context[:, :1, :1, None] + context[:, 1:2, :1, None]


def _contexts(batch=3):
    rng = np.random.default_rng(0)
    cond = jnp.asarray(rng.normal(size=(batch, 2, 4)) + 2.0, jnp.float32)
    uncond = jnp.asarray(rng.normal(size=(batch, 2, 4)), jnp.float32)
    return cond, uncond


@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_guidance_rescale_matches_diffusers(phi):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    cond, uncond = _contexts()
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
    t = jnp.full((3,), 500.0)
    w = 7.5
    ours = classifier_free_guidance(_toy_apply, cond, uncond, w, guidance_rescale=phi)(x, t)
    out_u = _toy_apply(x, t, uncond)
    out_c = _toy_apply(x, t, cond)
    guided = torch.from_numpy(np.array(out_u + w * (out_c - out_u)))
    ref = rescale_noise_cfg(guided, torch.from_numpy(np.array(out_c)), guidance_rescale=phi)
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-5, atol=1e-5)


def test_guidance_rescale_is_traced_without_recompiling():
    cond, uncond = _contexts()
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
    traces = []

    @jax.jit
    def run(phi):
        traces.append(1)
        return classifier_free_guidance(_toy_apply, cond, uncond, 5.0, guidance_rescale=phi)(
            x, jnp.full((3,), 10.0)
        )

    a, b = run(jnp.float32(0.2)), run(jnp.float32(0.9))
    assert len(traces) == 1 and not np.allclose(a, b)


def test_guidance_interval_guides_only_inside_the_sigma_interval():
    schedule = schedules.make_schedule()
    sigmas = schedules.sigmas_from_alphas_cumprod(schedule.alphas_cumprod)
    cond, uncond = _contexts(batch=3)
    x = jax.random.normal(jax.random.key(1), (3, 4, 4, 2))
    # Timesteps whose sigma is below, inside and above the interval (0.28, 5.42], the interval
    # Kynkaanniemi et al. 2024 report for EDM2 in these units.
    lo, hi = 0.28, 5.42
    t = jnp.asarray([np.searchsorted(sigmas, 0.1), np.searchsorted(sigmas, 1.0), 999], jnp.float32)
    w = 4.0
    ours = classifier_free_guidance(
        _toy_apply, cond, uncond, w, guidance_interval=(lo, hi), schedule=schedule
    )(x, t)
    out_u, out_c = _toy_apply(x, t, uncond), _toy_apply(x, t, cond)
    guided = out_u + w * (out_c - out_u)
    np.testing.assert_allclose(ours[0], out_c[0], rtol=1e-6)  # below: conditional only
    np.testing.assert_allclose(ours[1], guided[1], rtol=1e-6)  # inside: guided
    np.testing.assert_allclose(ours[2], out_c[2], rtol=1e-6)  # above: conditional only


def test_guidance_interval_needs_a_schedule_and_a_valid_interval():
    cond, uncond = _contexts()
    with pytest.raises(ValueError, match="schedule"):
        classifier_free_guidance(_toy_apply, cond, uncond, 2.0, guidance_interval=(0.1, 1.0))
    with pytest.raises(ValueError, match="lo < hi"):
        classifier_free_guidance(
            _toy_apply,
            cond,
            uncond,
            2.0,
            guidance_interval=(2.0, 1.0),
            schedule=schedules.make_schedule(),
        )
