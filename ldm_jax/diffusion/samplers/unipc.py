"""UniPC (Zhao et al. 2023), as diffusers' UniPCMultistepScheduler.

Each step is a UniP predictor (a multistep exponential integrator of order p, Alg. 2 / Eq. 11)
followed, once the next model output is known, by the UniC corrector (Eq. 8) that re-solves the
same step with that output included: order p + 1 for no extra network evaluation. The coefficients
(rho's of the linear systems R rho = b, Eq. 14) depend only on the sigmas, so they are computed on
the host and the loop forms linear combinations (`_vp.Plan`).
"""

from __future__ import annotations

import numpy as np

from ldm_jax.diffusion.samplers import _vp, check_img2img, register
from ldm_jax.diffusion.schedules import NoiseSchedule

SOLVER_TYPES = ("bh1", "bh2")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


def _uni_row(lam, alpha, sigma, s0, t, m, order, predict_x0, solver_type, model_t=None):
    """(sample coefficient, output-coefficient row) of UniP (model_t None) or UniC (model_t: the
    new output's vector) from sigma index s0 to t; m[k] is the vector of the output at s0 - k.
    Follows diffusers' `multistep_uni_p_bh_update` / `multistep_uni_c_bh_update`."""
    h = lam[t] - lam[s0]
    rks = np.array([(lam[s0 - k] - lam[s0]) / h for k in range(1, order)] + [1.0])
    d1s = [(m[k] - m[0]) / rks[k - 1] for k in range(1, order)]
    hh = -h if predict_x0 else h  # data prediction integrates in -lambda (Eq. 6 vs. 5)
    h_phi_1 = np.expm1(hh)
    b_h = hh if solver_type == "bh1" else np.expm1(hh)  # B(h) = h (bh1) or e^h - 1 (bh2)
    h_phi_k, factorial, rows, b = h_phi_1 / hh - 1, 1, [], []
    for j in range(1, order + 1):  # R[j-1] = r^(j-1), b[j-1] = phi_(j+1)(h) j! / B(h)
        rows.append(rks ** (j - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r_mat, b = np.stack(rows), np.array(b)
    if predict_x0:
        c_x, scale = sigma[t] / sigma[s0], alpha[t]
    else:
        c_x, scale = alpha[t] / alpha[s0], sigma[t]
    row = -scale * h_phi_1 * m[0]
    if model_t is None:
        if order == 1:  # no correction term; diffusers multiplies B(h) by 0 and gets NaN when
            return c_x, row  # B(h) = -inf (bh1 at a zero final sigma)
        rhos = [0.5] if order == 2 else np.linalg.solve(r_mat[:-1, :-1], b[:-1])
        res = sum(r * d for r, d in zip(rhos, d1s))
    else:
        rhos = [0.5] if order == 1 else np.linalg.solve(r_mat, b)
        res = sum((r * d for r, d in zip(rhos[:-1], d1s)), rhos[-1] * (model_t - m[0]))
    return c_x, row - scale * b_h * res


def _unipc_plan(
    ts, sigmas, num_steps, k, predict_x0, solver_type, lower_order_final, disabled, start=0
):
    """The plan from step `start` on (img2img): the warm-up counts from there and its first step
    has no corrector, as diffusers' (`lower_order_nums` and `last_sample` reset)."""
    alpha, sigma, lam = _vp.alpha_sigma_lambda(sigmas)
    n = num_steps
    orders = []  # diffusers' `this_order`: warm-up, then lower orders over the last steps
    for i in range(n):
        o = min(k, n - i) if lower_order_final else k
        orders.append(min(o, min(max(i - start, 0), k) + 1))
    e, ec = _vp.unit_vectors(k), _vp.unit_vectors(k + 1)
    c_x, c_h = np.zeros(n), np.zeros((n, k))
    corr_x, corr_anchor, corr_h = np.ones(n), np.zeros(n), np.zeros((n, k + 1))
    for i in range(n):
        if i > start and (i - 1) not in disabled:  # UniC for the step i-1 -> i, with the new output
            o = orders[i - 1]
            corr_anchor[i], corr_h[i] = _uni_row(
                lam, alpha, sigma, i - 1, i, ec[1:], o, predict_x0, solver_type, model_t=ec[0]
            )
            corr_x[i] = 0.0
        c_x[i], c_h[i] = _uni_row(
            lam, alpha, sigma, i, i + 1, e, orders[i], predict_x0, solver_type
        )
    return _vp.Plan(
        timesteps=ts.astype(np.float32),
        alpha=alpha[:-1],
        sigma=sigma[:-1],
        c_anchor=c_x,
        c_hist=c_h,
        reset_anchor=np.ones(n, bool),
        corrector=(corr_x, corr_anchor, corr_h),
    )


@register("unipc")
def unipc(
    model_fn,
    noise,
    schedule: NoiseSchedule,
    num_steps: int,
    rng=None,
    *,
    solver_order: int = 2,
    solver_type: str = "bh2",
    predict_x0: bool = True,
    lower_order_final: bool = True,
    disable_corrector=(),
    use_karras_sigmas: bool = False,
    use_exponential_sigmas: bool = False,
    use_beta_sigmas: bool = False,
    sigmas=None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    final_sigmas_type: str = "zero",
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    prediction_type: str = "epsilon",
    timestep_spacing: str = "linspace",
    steps_offset: int = 0,
    solver_p=None,
    use_flow_sigmas: bool = False,
    flow_shift: float = 1.0,
    use_dynamic_shifting: bool = False,
    time_shift_type: str = "exponential",
    shift_terminal: float | None = None,
    start_step: int = 0,
    init_latents=None,
):
    """UniPC multistep sampler (UniP-p + UniC, Zhao et al. 2023), orders 1-3, as diffusers'
    UniPCMultistepScheduler with its option names and defaults; NFE = num_steps.

    disable_corrector: step indices whose corrector is skipped (diffusers' list). sigma_min /
    sigma_max bound the Karras / exponential / beta sigmas. `sigmas`: an explicit schedule of
    num_steps decreasing sigmas, the model called at their fractional timesteps
    (`_vp.custom_sigma_schedule`). One deliberate difference: with solver_type="bh1" and a zero
    final sigma diffusers returns NaN (0 * inf); here the final first-order step is finite.
    `flow_shift`, `time_shift_type` are accepted and unused.
    """
    del flow_shift, time_shift_type
    _vp.check_vp_options(
        prediction_type, use_flow_sigmas=use_flow_sigmas, use_dynamic_shifting=use_dynamic_shifting
    )
    if solver_p is not None or shift_terminal is not None:
        raise ValueError("solver_p and shift_terminal are not supported")
    if solver_type in ("midpoint", "heun", "logrho"):  # diffusers' rename of other solvers' types
        solver_type = "bh2"
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"unknown solver_type {solver_type!r}; valid: {', '.join(SOLVER_TYPES)}")
    if solver_order not in (1, 2, 3):
        raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order}")
    if final_sigmas_type not in FINAL_SIGMAS_TYPES:
        raise ValueError(
            f"unknown final_sigmas_type {final_sigmas_type!r}; valid: {', '.join(FINAL_SIGMAS_TYPES)}"
        )
    acp = _vp.alphas_cumprod32(schedule)
    kind = _vp.sigma_schedule_option(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)
    ts, sigmas = _vp.timesteps_and_sigmas(
        acp,
        num_steps,
        timestep_spacing=timestep_spacing,
        steps_offset=steps_offset,
        sigma_schedule=kind,
        round_timesteps=kind in (None, "karras"),
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        custom_sigmas=sigmas,
    )
    # "sigma_min": the last sigma of a Karras/exponential/beta ramp, else (spaced timesteps or
    # custom `sigmas`) the training minimum.
    smallest = float(_vp.train_sigmas(acp)[0]) if kind is None else sigmas[-1]
    final = 0.0 if final_sigmas_type == "zero" else smallest
    sigmas = np.append(sigmas, final).astype(np.float32)
    check_img2img(noise, num_steps, start_step, init_latents)  # before start_step is used
    plan = _unipc_plan(
        ts,
        sigmas,
        num_steps,
        solver_order,
        predict_x0,
        solver_type,
        lower_order_final,
        set(disable_corrector),
        start_step,
    )
    threshold = None
    if thresholding and predict_x0:  # diffusers thresholds only the data prediction
        threshold = lambda x0: _vp.dynamic_threshold(
            x0, dynamic_thresholding_ratio, sample_max_value
        )
    return _vp.run_plan(
        model_fn,
        noise,
        plan,
        prediction_type=prediction_type,
        target="x0" if predict_x0 else "eps",
        threshold=threshold,
        start_step=start_step,
        init_latents=init_latents,
    )
