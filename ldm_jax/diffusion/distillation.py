"""Progressive distillation (Salimans & Ho 2022): the math, apart from any network or loop.

A student learns to do in one DDIM step what its teacher does in two, so N student steps replace
2N teacher steps; the student then teaches the next round (N/2 steps), and so on. Algorithm 2 of
the paper, on the discrete DDIM timesteps of diffusers' "trailing" spacing (the grid that reaches
t = T-1, so the first step starts from pure noise):

- student step k goes from t_k to t''_k; the teacher's 2N-step grid puts its own step boundary t'_k
  in between (`distillation_timesteps` checks that the grids nest);
- the teacher takes two deterministic DDIM steps z_t -> z_t' -> z_t'';
- the student's target is the x_0 with which one DDIM step from z_t lands exactly on z_t''
  (`distillation_target`, Algorithm 2's x~).

The loss is in the student's own parameterization (eps, v or x_0), as training is; the paper
weights the x_0 error by max(SNR, 1) for its v / x models, and an eps-parameterized student's
eps error is the SNR-weighted x_0 error.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.objectives import _bcast, predict_x0_and_eps

SPACING = "trailing"


def distillation_timesteps(schedule, student_steps: int, set_alpha_to_one: bool = True) -> dict:
    """Per student step k (numpy, [N] each): t, t_mid (the teacher's intermediate timestep),
    t_end, and alphas_cumprod at the three (`abar_t`, `abar_mid`, `abar_end`; past the last step
    abar is 1, or abar_0 without `set_alpha_to_one`, as DDIM's final step).

    These are exactly the pairs of the `ddim` sampler with timestep_spacing="trailing" at N and at
    2N steps (diffusers' DDIMScheduler: prev = t - T // N); a ValueError says when the 2N grid
    does not split every N-step interval in two (T not divisible by 2N, e.g. N = 16 of T = 1000).
    """
    from ldm_jax.diffusion.samplers.ddim_ddpm import _timestep_pairs

    if student_steps < 1:
        raise ValueError(f"student_steps must be >= 1, got {student_steps}")
    pairs = lambda n: [
        np.asarray(a) for a in _timestep_pairs(schedule, n, SPACING, 0, set_alpha_to_one)
    ]
    t, t_end, abar_t, abar_end = pairs(student_steps)
    tt, tt_prev, tabar, tabar_prev = pairs(2 * student_steps)
    nested = (
        np.array_equal(tt[0::2], t)
        and np.array_equal(tt_prev[0::2], tt[1::2])
        and np.array_equal(tt_prev[1::2], t_end)
    )
    if not nested:
        raise ValueError(
            f"the {2 * student_steps}-step DDIM grid ({SPACING} spacing over "
            f"{schedule.num_train_timesteps} timesteps) does not split the {student_steps}-step "
            f"one in two: t = {t.tolist()} -> {t_end.tolist()}, teacher {tt.tolist()}; choose "
            "student_steps with num_train_timesteps divisible by 2 * student_steps"
        )
    return dict(
        t=t.astype(np.float32),
        t_mid=tt[1::2].astype(np.float32),
        t_end=t_end,
        abar_t=abar_t,
        abar_mid=tabar[1::2],
        abar_end=abar_end,
    )


def ddim_step(model_output, x_t, abar_t, abar_next, prediction_type: str):
    """One deterministic DDIM step (Song et al. 2021, Eq. 12 with eta = 0): x_t -> x_next.
    abar_*: float[B]."""
    x0, eps = predict_x0_and_eps(model_output, x_t, abar_t, prediction_type)
    a = _bcast(abar_next, x_t)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * eps


def distillation_target(z_t, z_end, abar_t, abar_end):
    """Salimans & Ho 2022, Algorithm 2: x~ = (z'' - (s''/s) z) / (a'' - (s''/s) a), with a = sqrt
    abar and s = sqrt(1 - abar): the x_0 for which a DDIM step z_t -> t'' gives z_end."""
    a, a_end = jnp.sqrt(_bcast(abar_t, z_t)), jnp.sqrt(_bcast(abar_end, z_t))
    ratio = jnp.sqrt(1.0 - _bcast(abar_end, z_t)) / jnp.sqrt(1.0 - _bcast(abar_t, z_t))
    return (z_end - ratio * z_t) / (a_end - ratio * a)
