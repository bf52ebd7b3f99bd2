"""DEIS (Zhang & Chen 2023), as diffusers' DEISMultistepScheduler ("logrho" multistep variant).

DEIS integrates the probability-flow ODE in rho = sigma / alpha with the linear part solved
exactly; the noise prediction is extrapolated by a Lagrange polynomial through the last 1-3
outputs in log rho and integrated in closed form (Sec. 4, Eq. 14; "tAB-DEIS" with log-rho nodes).
The weights depend only on the sigmas, so they are computed on the host (`_vp.Plan`).
"""

from __future__ import annotations

import numpy as np

from ldm_jax.diffusion.samplers import _vp, check_img2img, register
from ldm_jax.diffusion.schedules import NoiseSchedule


def _ind2(t, b, c):
    """Antiderivative in rho, at rho = t, of the Lagrange basis polynomial in log rho that is 1 at
    node b and 0 at node c (diffusers' second-order `ind_fn`)."""
    lt, lb, lc = np.log(t), np.log(b), np.log(c)
    return t * (-lc + lt - 1) / (lb - lc)


def _ind3(t, b, c, d):
    """Same for three nodes b (value 1), c and d (value 0)."""
    lt, lb, lc, ld = np.log(t), np.log(b), np.log(c), np.log(d)
    num = t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2)
    return num / ((lb - lc) * (lb - ld))


def _deis_plan(ts, sigmas, orders, k) -> _vp.Plan:
    alpha, sigma, lam = _vp.alpha_sigma_lambda(sigmas)
    rho = sigma / alpha
    e = _vp.unit_vectors(k)
    n = len(ts)
    c_x, c_h = np.zeros(n), np.zeros((n, k))
    for i, o in enumerate(orders):
        t = i + 1
        c_x[i] = alpha[t] / alpha[i]
        if o == 1:  # the exponential-integrator (DDIM) step
            c_h[i] = -sigma[t] * np.expm1(lam[t] - lam[i]) * e[0]
            continue
        r = [rho[i - j] for j in range(o)]  # nodes: newest output first
        ind = _ind2 if o == 2 else _ind3
        for j in range(o):  # weight of output j: its basis polynomial integrated from r[0] to t
            others = r[j + 1 :] + r[:j]  # diffusers' argument order (cyclic)
            w = ind(rho[t], r[j], *others) - ind(r[0], r[j], *others)
            c_h[i] += alpha[t] * w * e[j]
    return _vp.Plan(
        timesteps=ts.astype(np.float32),
        alpha=alpha[:-1],
        sigma=sigma[:-1],
        c_anchor=c_x,
        c_hist=c_h,
        reset_anchor=np.ones(n, bool),
    )


@register("deis")
def deis(
    model_fn,
    noise,
    schedule: NoiseSchedule,
    num_steps: int,
    rng=None,
    *,
    solver_order: int = 2,
    algorithm_type: str = "deis",
    solver_type: str = "logrho",
    lower_order_final: bool = True,
    use_karras_sigmas: bool = False,
    use_exponential_sigmas: bool = False,
    use_beta_sigmas: bool = False,
    sigmas=None,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    prediction_type: str = "epsilon",
    timestep_spacing: str = "linspace",
    steps_offset: int = 0,
    use_flow_sigmas: bool = False,
    flow_shift: float = 1.0,
    use_dynamic_shifting: bool = False,
    time_shift_type: str = "exponential",
    start_step: int = 0,
    init_latents=None,
):
    """DEIS multistep sampler, orders 1-3, as diffusers' DEISMultistepScheduler with its option
    names and defaults; NFE = num_steps. The final sigma is the smallest one (the training
    minimum, or the last Karras/exponential/beta sigma), never zero, as in diffusers.
    `sigmas`: an explicit schedule as in `dpm_solver_multistep` (then ending at the training
    minimum).
    `flow_shift`, `time_shift_type` are accepted and unused."""
    del flow_shift, time_shift_type
    _vp.check_vp_options(
        prediction_type, use_flow_sigmas=use_flow_sigmas, use_dynamic_shifting=use_dynamic_shifting
    )
    if algorithm_type in ("dpmsolver", "dpmsolver++"):  # diffusers' rename of DPM configs
        algorithm_type = "deis"
    if solver_type in ("midpoint", "heun", "bh1", "bh2"):
        solver_type = "logrho"
    if algorithm_type != "deis" or solver_type != "logrho":
        raise ValueError(
            f"only algorithm_type='deis' with solver_type='logrho' exists, got "
            f"{algorithm_type!r}, {solver_type!r}"
        )
    if solver_order not in (1, 2, 3):
        raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order}")
    acp = _vp.alphas_cumprod32(schedule)
    kind = _vp.sigma_schedule_option(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)
    ts, sigmas = _vp.timesteps_and_sigmas(
        acp,
        num_steps,
        timestep_spacing=timestep_spacing,
        steps_offset=steps_offset,
        sigma_schedule=kind,
        round_timesteps=kind in (None, "karras"),
        custom_sigmas=sigmas,
    )
    final = float(_vp.train_sigmas(acp)[0]) if kind is None else sigmas[-1]
    sigmas = np.append(sigmas, final).astype(np.float32)
    check_img2img(noise, num_steps, start_step, init_latents)  # before start_step is used
    orders = _vp.multistep_orders(num_steps, solver_order, lower_order_final, start=start_step)
    plan = _deis_plan(ts, sigmas, orders, solver_order)
    threshold = None
    if thresholding:
        threshold = lambda x0: _vp.dynamic_threshold(
            x0, dynamic_thresholding_ratio, sample_max_value
        )
    return _vp.run_plan(
        model_fn,
        noise,
        plan,
        prediction_type=prediction_type,
        target="eps_via_x0",
        threshold=threshold,
        start_step=start_step,
        init_latents=init_latents,
    )
