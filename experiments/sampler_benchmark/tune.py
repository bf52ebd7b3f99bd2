"""Beyond diffusers: optimize the sigma schedule of DPM-Solver++(2M) and UniPC per NFE.

Align Your Steps (Sabour et al. 2024) and LD3 (Tong et al. 2024) show that a schedule optimized
for one model beats the generic ones (uniform in t, Karras, log-SNR) at 5-10 steps. Here the
"model" is the Gaussian mixture's exact denoiser, and the criterion is the benchmark's own: the
sliced W2 to the data. Honesty: the schedules are chosen in a *tuning world* (`--seed 0`: its
own initial noise, directions and exact quantiles, 16384 points), and run.py reports them in the
evaluation world (seed 1) next to every diffusers sampler.

Each schedule: N sigmas, the first fixed at the largest training sigma (where the initial noise
lives), the other N - 1 free in log sigma inside the training range, followed by 0 (the solver's
final step). Start from the best of a few generic schedules, then Nelder-Mead. Tuning evaluates
the solver's coefficient plan (built by the library's own host code) in one compiled loop, so new
sigmas do not recompile; the result is then checked against the registered sampler run with
`sigmas=...`, which is how run.py uses it.

    python experiments/sampler_benchmark/tune.py  # writes tuned_schedules.json beside it
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np
import run as bench
from scipy.optimize import minimize

from ldm_jax.diffusion import samplers, schedules
from ldm_jax.diffusion.samplers import _vp, dpm_solver, unipc

SOLVERS = ("dpmpp_2m", "unipc", "dpmpp_2m_sde")


def plan_for(solver: str, acp32: np.ndarray, sigmas: np.ndarray) -> _vp.Plan:
    """The coefficient plan `samplers.get_sampler(solver)(..., sigmas=sigmas)` runs (defaults
    otherwise: 2nd order, lower_order_final, final sigma 0; UniPC bh2 with its corrector)."""
    n = len(sigmas)
    ts, sig = _vp.custom_sigma_schedule(_vp.train_sigmas(acp32), n, sigmas)
    sig = np.append(sig, 0.0).astype(np.float32)
    if solver in ("dpmpp_2m", "dpmpp_2m_sde"):
        algorithm = "sde-dpmsolver++" if solver.endswith("sde") else "dpmsolver++"
        orders = _vp.multistep_orders(n, 2, lower_order_final=True, first_order_final=True)
        return dpm_solver._multistep_plan(ts, sig, orders, algorithm, "midpoint", 2, True)
    return unipc._unipc_plan(ts, sig, n, 2, True, "bh2", True, set())


def plan_arrays(plan: _vp.Plan) -> dict:
    fields = ("timesteps", "alpha", "sigma", "c_anchor", "c_hist", "reset_anchor", "c_noise")
    fields += ("corrector",)
    arrays = {k: getattr(plan, k) for k in fields if getattr(plan, k) is not None}
    return jax.tree.map(lambda a: jnp.asarray(a, bool if a.dtype == bool else jnp.float32), arrays)


def make_objective(solver: str, setup: bench.Setup):
    """sigmas -> sliced W2 of the solver's samples in `setup`'s world (one compile per N)."""
    acp32 = _vp.alphas_cumprod32(setup.schedule)

    @jax.jit
    def run(arrays, noise, rng):
        plan = _vp.Plan(**arrays)
        return _vp.run_plan(
            setup.model_fn, noise, plan, rng, prediction_type="epsilon", target="x0"
        )

    def objective(sigmas):
        arrays = plan_arrays(plan_for(solver, acp32, np.asarray(sigmas)))
        x = run(arrays, setup.noise, setup.rng)
        x = np.asarray(x)
        return bench.sliced_w2(x, setup.quantiles, setup.dirs) if np.isfinite(x).all() else 10.0

    return objective, run, acp32


def generic_schedules(n: int, lo: float, hi: float, acp) -> dict:
    """Starting points: Karras (rho 7 and 20), uniform in log sigma, and uniform in t^(1/2)
    (denser at low noise than diffusers' uniform-in-t spacing)."""
    sig = schedules.sigmas_from_alphas_cumprod(acp)
    t = 999 * np.linspace(1, 0, n) ** 2
    return {
        "karras rho 7": schedules.karras_sigmas(n, lo, hi, 7.0),
        "karras rho 20": schedules.karras_sigmas(n, lo, hi, 20.0),
        "log-uniform": schedules.exponential_sigmas(n, lo, hi),
        "quadratic in t": np.exp(np.interp(t, np.arange(len(sig)), np.log(sig))),
    }


def tune(solver: str, n: int, setup: bench.Setup, max_evals: int) -> dict:
    objective, _, acp32 = make_objective(solver, setup)
    train = _vp.train_sigmas(acp32).astype(np.float64)
    lo, hi = float(train[0]), float(train[-1])
    log_lo, log_hi = np.log(lo), np.log(hi)
    starts = {k: objective(v) for k, v in generic_schedules(n, lo, hi, acp32).items()}
    start_name = min(starts, key=starts.get)
    start = generic_schedules(n, lo, hi, acp32)[start_name]

    def unpack(p):
        return np.exp(np.concatenate([[log_hi], p]))

    def penalized(p):  # decreasing, inside the training range
        if np.any(np.diff(p) >= -1e-4) or p[0] >= log_hi - 1e-4 or p[-1] < log_lo:
            return 10.0
        return objective(unpack(p))

    t0 = time.perf_counter()
    res = minimize(
        penalized,
        np.log(start[1:]),
        method="Nelder-Mead",
        options=dict(maxfev=max_evals, xatol=1e-3, fatol=1e-5, adaptive=True),
    )
    return dict(
        sigmas=[float(s) for s in unpack(res.x)],
        tuning_sw=float(res.fun),
        start=start_name,
        start_sw=float(starts[start_name]),
        generic_sw=starts,
        evaluations=int(res.nfev),
        seconds=time.perf_counter() - t0,
    )


def check_against_registry(solver: str, sigmas, setup: bench.Setup):
    """The tuning loop and the registered sampler (`sigmas=` option) give the same samples."""
    _, run, acp32 = make_objective(solver, setup)
    noise = setup.noise[:256]
    mine = run(plan_arrays(plan_for(solver, acp32, np.asarray(sigmas))), noise, setup.rng)
    sampler = samplers.get_sampler(solver)
    n = len(sigmas)
    theirs = sampler(setup.model_fn, noise, setup.schedule, n, setup.rng, sigmas=tuple(sigmas))
    np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), atol=1e-4)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(bench.HERE / "tuned_schedules.json"))
    p.add_argument("--nfe", default="4,5,8,10", help="step counts (= NFE) to tune")
    p.add_argument("--solvers", default=",".join(SOLVERS))
    p.add_argument("--num-points", type=int, default=16384)
    p.add_argument("--num-projections", type=int, default=256)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="the tuning world (run.py reports seed 1)")
    p.add_argument("--evals-per-sigma", type=int, default=60, help="Nelder-Mead budget / sigma")
    args = p.parse_args(argv)
    setup = bench.make_setup(args.num_points, args.dim, args.num_projections, args.seed)
    print(f"tuning world: seed {args.seed}, noise floor {np.mean(setup.floors):.4f}", flush=True)
    out = pathlib.Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    for solver in args.solvers.split(","):
        entry = result.setdefault(solver, {"schedules": {}})
        entry["command"] = " ".join(["python experiments/sampler_benchmark/tune.py", *(argv or [])])
        for n in (int(s) for s in args.nfe.split(",")):
            r = tune(solver, n, setup, args.evals_per_sigma * (n - 1))
            check_against_registry(solver, r["sigmas"], setup)
            entry["schedules"][str(n)] = r
            print(
                f"{solver} NFE {n}: {r['start']} {r['start_sw']:.4f} -> {r['tuning_sw']:.4f} "
                f"({r['evaluations']} evaluations, {r['seconds']:.0f} s)\n"
                f"  sigmas {np.round(r['sigmas'], 4).tolist()}",
                flush=True,
            )
            result["meta"] = dict(
                seed=args.seed,
                num_points=args.num_points,
                num_projections=args.num_projections,
                dim=args.dim,
                noise_floor=float(np.mean(setup.floors)),
            )
            out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
