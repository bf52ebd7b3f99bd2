"""Progressive distillation: the target math against the samplers, on data with an exact denoiser.

The check that matters: a student that predicts exactly its targets, sampled by the library's own
`ddim` sampler at N steps (trailing spacing), reproduces the teacher's 2N-step DDIM samples. The
teacher is the Bayes-optimal denoiser of a Gaussian mixture, so nothing here is trained.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import distillation, samplers, schedules
from ldm_jax.diffusion.gaussian_mixture import default_mixture, exact_model_fn

SCHEDULE = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012)  # SD's
GMM = default_mixture(dim=4)


def test_target_is_the_x0_of_one_ddim_step():
    """Algorithm 2's x~: one DDIM step from z_t with x_0 = x~ lands on z_end, at every step."""
    grid = distillation.distillation_timesteps(SCHEDULE, 4)
    k1, k2 = jax.random.split(jax.random.key(0))
    z_t, z_end = jax.random.normal(k1, (4, 8)), jax.random.normal(k2, (4, 8))
    a, a_end = jnp.asarray(grid["abar_t"]), jnp.asarray(grid["abar_end"])
    x_target = distillation.distillation_target(z_t, z_end, a, a_end)
    landed = distillation.ddim_step(x_target, z_t, a, a_end, "sample")
    np.testing.assert_allclose(landed, z_end, atol=1e-5, rtol=0)
    assert grid["abar_end"][-1] == 1.0  # the last step ends on x_0 itself (set_alpha_to_one)
    np.testing.assert_allclose(x_target[-1], z_end[-1], atol=1e-6)


@pytest.mark.parametrize("student_steps", [1, 2, 4])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_an_exact_student_reproduces_its_teacher(student_steps, prediction_type):
    teacher = exact_model_fn(GMM, SCHEDULE, prediction_type)
    grid = {k: jnp.asarray(v) for k, v in distillation.distillation_timesteps(
        SCHEDULE, student_steps).items()}  # fmt: skip

    def oracle_student(x, t):
        """What a perfectly trained student outputs: the target of the training loss."""
        k = jnp.argmin(jnp.abs(grid["t"][None, :] - t[:, None]), axis=1)
        at = lambda name: grid[name][k]
        z_mid = distillation.ddim_step(
            teacher(x, t), x, at("abar_t"), at("abar_mid"), prediction_type
        )
        z_end = distillation.ddim_step(
            teacher(z_mid, at("t_mid")), z_mid, at("abar_mid"), at("abar_end"), prediction_type
        )
        x_target = distillation.distillation_target(x, z_end, at("abar_t"), at("abar_end"))
        a = at("abar_t")[:, None]
        eps = (x - jnp.sqrt(a) * x_target) / jnp.sqrt(1 - a)
        if prediction_type == "epsilon":
            return eps
        return jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x_target

    noise = jax.random.normal(jax.random.key(1), (64, GMM.dim))
    ddim = samplers.get_sampler("ddim")
    options = dict(prediction_type=prediction_type, timestep_spacing="trailing")
    student = ddim(oracle_student, noise, SCHEDULE, student_steps, **options)
    reference = ddim(teacher, noise, SCHEDULE, 2 * student_steps, **options)
    # float32 round-off of the re-parameterizations: measured <= 5.1e-6 (eps) and 7.8e-7 (v).
    # A grid or target off by a step gives O(1): plain N-step DDIM is 0.63-1.47 away.
    np.testing.assert_allclose(student, reference, atol=5e-5, rtol=0)
    plain = ddim(teacher, noise, SCHEDULE, student_steps, **options)
    assert float(jnp.max(jnp.abs(plain - reference))) > 0.5


def test_grids_that_do_not_nest_are_refused():
    with pytest.raises(ValueError, match="does not split the 8-step one in two"):
        distillation.distillation_timesteps(SCHEDULE, 8)  # 1000 / 16 is not an integer
    with pytest.raises(ValueError, match="student_steps must be >= 1"):
        distillation.distillation_timesteps(SCHEDULE, 0)
