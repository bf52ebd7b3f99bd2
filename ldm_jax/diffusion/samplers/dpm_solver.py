"""DPM-Solver (Lu et al. 2022a) and DPM-Solver++ (Lu et al. 2022b), multistep and singlestep, with
the SDE variants, as diffusers' DPMSolverMultistepScheduler and DPMSolverSinglestepScheduler.

Every update is an exponential integrator over the log-SNR step h = lambda_t - lambda_s: the
linear part of the diffusion ODE is solved exactly and the model output is expanded in h to order
1-3 (Taylor terms D0, D1, D2 of Lu et al. 2022a, Eq. 3.6). The coefficients depend only on the
sigmas, so they are computed on the host (`_vp.Plan`) and the loop only forms linear combinations.
"""

from __future__ import annotations

import numpy as np

from ldm_jax.diffusion.samplers import _vp, check_img2img, register
from ldm_jax.diffusion.schedules import NoiseSchedule

MULTISTEP_ALGORITHMS = ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++")
SINGLESTEP_ALGORITHMS = ("dpmsolver", "dpmsolver++", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


def _phi(algorithm_type: str, h, alpha_t, sigma_t, alpha_a, sigma_a, diffusers_sde_d2=True) -> dict:
    """Coefficients of one step from the anchor a to t: x_t = x * x_a + d0 D0 + d1 D1 + d2 D2
    (+ noise z), and `mid`, the midpoint variant's D1 coefficient.

    dpmsolver++: data prediction (Lu et al. 2022b, Sec. 4); dpmsolver: noise prediction (Lu et
    al. 2022a, Sec. 3); sde-dpmsolver++ / sde-dpmsolver: the same integrators for the reverse SDE
    with the noise term that keeps the marginals exact (Lu et al. 2022b, Sec. 5 and App.).

    diffusers 0.42's third-order SDE D2 coefficient (`diffusers_sde_d2`) ends in - 1/2 where its
    own ODE counterpart and k-diffusion's `sample_dpmpp_3m_sde` have + 1/2: it is O(1) instead of
    O(h), so samples drift away from the data as the number of steps grows. False gives
    alpha_t ((1 - e^(-2h) - 2h) / (2h)^2 + 1/2).
    """
    with np.errstate(all="ignore"):  # h = inf at a final sigma of 0: only `x`/`d0` are used then
        em, ep, e2 = np.exp(-h), np.exp(h), np.exp(-2 * h)
        if algorithm_type == "dpmsolver++":
            c = dict(x=sigma_t / sigma_a, d0=-alpha_t * (em - 1), mid=-0.5 * alpha_t * (em - 1))
            c.update(d1=alpha_t * ((em - 1) / h + 1), d2=-alpha_t * ((em - 1 + h) / h**2 - 0.5))
        elif algorithm_type == "dpmsolver":
            c = dict(x=alpha_t / alpha_a, d0=-sigma_t * (ep - 1), mid=-0.5 * sigma_t * (ep - 1))
            c.update(d1=-sigma_t * ((ep - 1) / h - 1), d2=-sigma_t * ((ep - 1 - h) / h**2 - 0.5))
        elif algorithm_type == "sde-dpmsolver++":
            c = dict(x=sigma_t / sigma_a * em, d0=alpha_t * (1 - e2), mid=0.5 * alpha_t * (1 - e2))
            c.update(d1=alpha_t * ((1 - e2) / (-2 * h) + 1))
            c.update(
                d2=alpha_t * ((1 - e2 - 2 * h) / (2 * h) ** 2 + (-0.5 if diffusers_sde_d2 else 0.5))
            )
            c.update(noise=sigma_t * np.sqrt(1 - e2))
        else:  # sde-dpmsolver (first and second order only, as in diffusers)
            c = dict(x=alpha_t / alpha_a, d0=-2 * sigma_t * (ep - 1), mid=-sigma_t * (ep - 1))
            c.update(d1=-2 * sigma_t * ((ep - 1) / h - 1), noise=sigma_t * np.sqrt(ep**2 - 1))
    c.setdefault("noise", 0.0)
    return c


def _multistep_plan(ts, sigmas, orders, algorithm_type, solver_type, k, sde_d2) -> _vp.Plan:
    """Multistep: the anchor is the current sample; D1, D2 are divided differences of the last
    2-3 outputs in lambda (Lu et al. 2022b, Alg. 2 and its third-order extension)."""
    alpha, sigma, lam = _vp.alpha_sigma_lambda(sigmas)
    e = _vp.unit_vectors(k)
    n = len(ts)
    c_x, c_h, c_n = np.zeros(n), np.zeros((n, k)), np.zeros(n)
    for i, o in enumerate(orders):
        h = lam[i + 1] - lam[i]
        c = _phi(algorithm_type, h, alpha[i + 1], sigma[i + 1], alpha[i], sigma[i], sde_d2)
        row = c["d0"] * e[0]
        if o == 2:
            d1 = (e[0] - e[1]) / ((lam[i] - lam[i - 1]) / h)
            row = row + c["mid" if solver_type == "midpoint" else "d1"] * d1
        elif o == 3:
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            d1_0, d1_1 = (e[0] - e[1]) / r0, (e[1] - e[2]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            row = row + c["d1"] * d1 + c["d2"] * d2
        c_x[i], c_h[i], c_n[i] = c["x"], row, c["noise"]
    return _vp.Plan(
        timesteps=ts.astype(np.float32),
        alpha=alpha[:-1],
        sigma=sigma[:-1],
        c_anchor=c_x,
        c_hist=c_h,
        reset_anchor=np.ones(n, bool),
        c_noise=c_n if algorithm_type.startswith("sde") else None,
    )


def _singlestep_plan(ts, sigmas, orders, algorithm_type, solver_type, k, sde_d2) -> _vp.Plan:
    """Singlestep: an order-o group starts at an anchor sample; its first o - 1 steps only place
    intermediate model evaluations, and the group's last step goes from the anchor to the group's
    end with all of them (Lu et al. 2022a, Algs. 1-2 / DPM-Solver-2S, -3S)."""
    alpha, sigma, lam = _vp.alpha_sigma_lambda(sigmas)
    e = _vp.unit_vectors(k)
    n = len(ts)
    c_x, c_h, c_n = np.zeros(n), np.zeros((n, k)), np.zeros(n)
    for i, o in enumerate(orders):
        a = i - (o - 1)  # the anchor's step
        h = lam[i + 1] - lam[a]
        c = _phi(algorithm_type, h, alpha[i + 1], sigma[i + 1], alpha[a], sigma[a], sde_d2)
        if o == 1:
            row = c["d0"] * e[0]
        elif o == 2:
            d1 = (e[0] - e[1]) / ((lam[i] - lam[a]) / h)
            row = c["d0"] * e[1] + c["mid" if solver_type == "midpoint" else "d1"] * d1
        else:
            r0, r1 = (lam[i] - lam[a]) / h, (lam[i - 1] - lam[a]) / h
            d1_0, d1_1 = (e[1] - e[2]) / r1, (e[0] - e[2]) / r0
            if solver_type == "midpoint":
                row = c["d0"] * e[2] + c["d1"] * d1_1
            else:
                d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
                d2 = 2 * (d1_1 - d1_0) / (r0 - r1)
                row = c["d0"] * e[2] + c["d1"] * d1 + c["d2"] * d2
        c_x[i], c_h[i], c_n[i] = c["x"], row, c["noise"]
    return _vp.Plan(
        timesteps=ts.astype(np.float32),
        alpha=alpha[:-1],
        sigma=sigma[:-1],
        c_anchor=c_x,
        c_hist=c_h,
        reset_anchor=np.array([o == 1 for o in orders]),
        c_noise=c_n if algorithm_type.startswith("sde") else None,
    )


def _singlestep_orders(
    num_steps, solver_order, lower_order_final, final_zero, start=0
) -> list[int]:
    """diffusers' `get_order_list` (after `set_timesteps` forces lower_order_final on for an
    uneven number of steps or a zero final sigma), then the warm-up fallback of `step`: an order
    needs that many outputs since the first step run (`start`; img2img starts part-way into an
    order group, which then begins with order 1, an anchor)."""
    n, o = num_steps, solver_order
    if n % o != 0 or final_zero:
        lower_order_final = True
    if not lower_order_final:
        orders = list(range(1, o + 1)) * (n // o)
    elif o == 3:
        tail = {0: [1, 2, 1], 1: [1], 2: [1, 2]}[n % 3]
        orders = [1, 2, 3] * (n // 3 - (n % 3 == 0)) + tail
    elif o == 2:
        orders = [1, 2] * (n // 2 - (n % 2 == 0)) + ([1, 1] if n % 2 == 0 else [1])
    else:
        orders = [1] * n
    if final_zero:
        orders[-1] = 1
    return [min(o, max(i - start, 0) + 1) for i, o in enumerate(orders)]


def _check(name, value, valid):
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


def _setup(
    schedule,
    prediction_type,
    algorithm_type,
    algorithms,
    solver_type,
    solver_order,
    final_sigmas_type,
    **vp_options,
):
    """Validate the options shared by both schedulers (with diffusers' silent renames of other
    schedulers' values) -> (algorithm_type, solver_type, float32 alphas_cumprod, final sigma)."""
    _vp.check_vp_options(prediction_type, **vp_options)
    if algorithm_type == "deis":  # diffusers maps DEIS configs onto DPM-Solver++
        algorithm_type = "dpmsolver++"
    _check("algorithm_type", algorithm_type, algorithms)
    if solver_type in ("logrho", "bh1", "bh2"):  # likewise for DEIS/UniPC solver types
        solver_type = "midpoint"
    _check("solver_type", solver_type, SOLVER_TYPES)
    if solver_order not in (1, 2, 3):
        raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order}")
    _check("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
    if final_sigmas_type == "zero" and not algorithm_type.endswith("++"):
        raise ValueError(
            f"final_sigmas_type='zero' needs a data-prediction solver (dpmsolver++); "
            f"with algorithm_type={algorithm_type!r} use final_sigmas_type='sigma_min'"
        )
    acp = _vp.alphas_cumprod32(schedule)
    final = 0.0 if final_sigmas_type == "zero" else float(_vp.train_sigmas(acp)[0])
    return algorithm_type, solver_type, acp, final


def _threshold_fn(thresholding, ratio, max_value):
    if not thresholding:
        return None
    return lambda x0: _vp.dynamic_threshold(x0, ratio, max_value)


@register("dpm_solver_multistep")
def dpm_solver_multistep(
    model_fn,
    noise,
    schedule: NoiseSchedule,
    num_steps: int,
    rng=None,
    *,
    solver_order: int = 2,
    algorithm_type: str = "dpmsolver++",
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    euler_at_final: bool = False,
    use_karras_sigmas: bool = False,
    use_exponential_sigmas: bool = False,
    use_beta_sigmas: bool = False,
    use_lu_lambdas: bool = False,
    sigmas=None,
    final_sigmas_type: str = "zero",
    lambda_min_clipped: float = -float("inf"),
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    prediction_type: str = "epsilon",
    timestep_spacing: str = "linspace",
    steps_offset: int = 0,
    beta_schedule: str | None = None,
    diffusers_sde_third_order: bool = True,
    variance_type: str | None = None,
    use_flow_sigmas: bool = False,
    flow_shift: float = 1.0,
    use_dynamic_shifting: bool = False,
    time_shift_type: str = "exponential",
    start_step: int = 0,
    init_latents=None,
):
    """Multistep DPM-Solver / DPM-Solver++ (Lu et al. 2022b, Alg. 2), ODE or SDE, orders 1-3, as
    diffusers' DPMSolverMultistepScheduler with the same option names and defaults.

    `beta_schedule` is only read for a diffusers quirk: with "squaredcos_cap_v2", the timesteps of
    Karras / lu sigmas are truncated instead of rounded. `flow_shift` and `time_shift_type` are
    accepted for config compatibility and unused (no flow sigmas). SDE variants need `rng`.
    `diffusers_sde_third_order` (not a diffusers option): True reproduces diffusers' third-order
    SDE step, False corrects its D2 coefficient (see `_phi`; `dpmpp_3m_sde` uses False).
    `sigmas`: an explicit schedule of num_steps decreasing sigmas instead of the spaced or
    Karras/... ones (diffusers' custom `timesteps`); the model is called at their fractional
    timesteps (`_vp.custom_sigma_schedule`).
    """
    del flow_shift, time_shift_type
    algorithm_type, solver_type, acp, final = _setup(
        schedule,
        prediction_type,
        algorithm_type,
        MULTISTEP_ALGORITHMS,
        solver_type,
        solver_order,
        final_sigmas_type,
        variance_type=variance_type,
        use_flow_sigmas=use_flow_sigmas,
        use_dynamic_shifting=use_dynamic_shifting,
    )
    if algorithm_type == "sde-dpmsolver" and solver_order == 3:
        raise ValueError("sde-dpmsolver has no third-order update; use sde-dpmsolver++")
    kind = _vp.sigma_schedule_option(
        use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, use_lu_lambdas
    )
    ts, sigmas = _vp.timesteps_and_sigmas(
        acp,
        num_steps,
        timestep_spacing=timestep_spacing,
        steps_offset=steps_offset,
        last=_vp.last_timestep(acp, lambda_min_clipped),
        sigma_schedule=kind,
        round_timesteps=kind in (None, "karras", "lu") and beta_schedule != "squaredcos_cap_v2",
        custom_sigmas=sigmas,
    )
    sigmas = np.append(sigmas, final).astype(np.float32)
    check_img2img(noise, num_steps, start_step, init_latents)  # before start_step is used
    orders = _vp.multistep_orders(
        num_steps,
        solver_order,
        lower_order_final,
        euler_at_final or final_sigmas_type == "zero",
        start=start_step,
    )
    plan = _multistep_plan(
        ts, sigmas, orders, algorithm_type, solver_type, solver_order, diffusers_sde_third_order
    )
    threshold = _threshold_fn(thresholding, dynamic_thresholding_ratio, sample_max_value)
    target = "x0" if algorithm_type.endswith("++") else "eps"
    return _vp.run_plan(
        model_fn,
        noise,
        plan,
        rng,
        prediction_type=prediction_type,
        target=target,
        threshold=threshold,
        start_step=start_step,
        init_latents=init_latents,
    )


@register("dpm_solver_singlestep")
def dpm_solver_singlestep(
    model_fn,
    noise,
    schedule: NoiseSchedule,
    num_steps: int,
    rng=None,
    *,
    solver_order: int = 2,
    algorithm_type: str = "dpmsolver++",
    solver_type: str = "midpoint",
    lower_order_final: bool = False,
    use_karras_sigmas: bool = False,
    use_exponential_sigmas: bool = False,
    use_beta_sigmas: bool = False,
    sigmas=None,
    final_sigmas_type: str = "zero",
    lambda_min_clipped: float = -float("inf"),
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    prediction_type: str = "epsilon",
    timestep_spacing: str = "linspace",
    steps_offset: int = 0,
    variance_type: str | None = None,
    use_flow_sigmas: bool = False,
    flow_shift: float = 1.0,
    use_dynamic_shifting: bool = False,
    time_shift_type: str = "exponential",
    diffusers_sde_third_order: bool = True,
    start_step: int = 0,
    init_latents=None,
):
    """Singlestep DPM-Solver / DPM-Solver++ (Lu et al. 2022a, Algs. 1-2; 2022b, Alg. 1), orders
    1-3, as diffusers' DPMSolverSinglestepScheduler (order groups 1, 2, 3, 1, 2, 3, ...: NFE =
    num_steps).

    diffusers' singlestep scheduler has no timestep spacing: its timesteps are always "linspace"
    from T - 1, so `timestep_spacing` / `steps_offset` are accepted for the common signature and
    ignored. Thresholding needs dpmsolver++ (diffusers' noise-prediction path for it is broken).
    `diffusers_sde_third_order` and `sigmas` as in `dpm_solver_multistep` (the former for the heun
    solver type only).
    """
    del timestep_spacing, steps_offset, flow_shift, time_shift_type
    algorithm_type, solver_type, acp, final = _setup(
        schedule,
        prediction_type,
        algorithm_type,
        SINGLESTEP_ALGORITHMS,
        solver_type,
        solver_order,
        final_sigmas_type,
        variance_type=variance_type,
        use_flow_sigmas=use_flow_sigmas,
        use_dynamic_shifting=use_dynamic_shifting,
    )
    if thresholding and algorithm_type == "dpmsolver":
        raise ValueError("thresholding with the singlestep solver needs algorithm_type dpmsolver++")
    kind = _vp.sigma_schedule_option(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)
    ts, sigmas = _vp.timesteps_and_sigmas(
        acp,
        num_steps,
        timestep_spacing="linspace",
        steps_offset=0,
        last=_vp.last_timestep(acp, lambda_min_clipped),
        sigma_schedule=kind,
        round_timesteps=kind in (None, "karras"),
        custom_sigmas=sigmas,
    )
    sigmas = np.append(sigmas, final).astype(np.float32)
    check_img2img(noise, num_steps, start_step, init_latents)  # before start_step is used
    orders = _singlestep_orders(
        num_steps, solver_order, lower_order_final, final_sigmas_type == "zero", start_step
    )
    plan = _singlestep_plan(
        ts, sigmas, orders, algorithm_type, solver_type, solver_order, diffusers_sde_third_order
    )
    threshold = _threshold_fn(thresholding, dynamic_thresholding_ratio, sample_max_value)
    target = "x0" if algorithm_type.endswith("++") else "eps"
    return _vp.run_plan(
        model_fn,
        noise,
        plan,
        rng,
        prediction_type=prediction_type,
        target=target,
        threshold=threshold,
        start_step=start_step,
        init_latents=init_latents,
    )


def _alias(name: str, base, summary: str, fixed: dict, defaults: dict | None = None):
    """Register `name` as `base` with `fixed` options (passing one of them is a TypeError) and
    different `defaults` (which may be overridden)."""
    defaults = defaults or {}

    def sampler(model_fn, noise, schedule, num_steps, rng=None, **options):
        clash = sorted(set(options) & set(fixed))
        if clash:
            raise TypeError(f"sampler {name!r} fixes {clash}; use {base.__name__!r} to set them")
        return base(model_fn, noise, schedule, num_steps, rng, **{**defaults, **fixed, **options})

    sampler.__name__ = sampler.__qualname__ = name
    sampler.__wrapped__ = base  # inspect.signature shows the options it forwards to
    fixed_text = ", ".join(f"{k}={v!r}" for k, v in {**fixed, **defaults}.items())
    sampler.__doc__ = f"{summary}: `{base.__name__}` with {fixed_text}; other options as there."
    register(name)(sampler)
    return sampler


dpmpp_2m = _alias(
    "dpmpp_2m",
    dpm_solver_multistep,
    "DPM-Solver++(2M)",
    dict(algorithm_type="dpmsolver++", solver_order=2),
)
dpmpp_3m = _alias(
    "dpmpp_3m",
    dpm_solver_multistep,
    "DPM-Solver++(3M)",
    dict(algorithm_type="dpmsolver++", solver_order=3),
)
dpmpp_2m_sde = _alias(
    "dpmpp_2m_sde",
    dpm_solver_multistep,
    "SDE-DPM-Solver++(2M)",
    dict(algorithm_type="sde-dpmsolver++", solver_order=2),
)
dpmpp_3m_sde = _alias(
    "dpmpp_3m_sde",
    dpm_solver_multistep,
    "SDE-DPM-Solver++(3M), k-diffusion's `sample_dpmpp_3m_sde`",
    dict(algorithm_type="sde-dpmsolver++", solver_order=3, diffusers_sde_third_order=False),
)
dpm_solver = _alias(
    "dpm_solver",
    dpm_solver_multistep,
    "Multistep DPM-Solver-2 (noise prediction)",
    dict(algorithm_type="dpmsolver", solver_order=2),
    dict(final_sigmas_type="sigma_min"),
)
dpmpp_2s = _alias(
    "dpmpp_2s",
    dpm_solver_singlestep,
    "DPM-Solver++(2S)",
    dict(algorithm_type="dpmsolver++", solver_order=2),
)
dpm_solver_3s = _alias(
    "dpm_solver_3s",
    dpm_solver_singlestep,
    "Singlestep DPM-Solver-3 (Lu et al. 2022a, Alg. 2)",
    dict(algorithm_type="dpmsolver", solver_order=3),
    dict(final_sigmas_type="sigma_min"),
)
