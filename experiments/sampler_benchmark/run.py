"""Sampler benchmark with a known answer: every sampler against the exact data distribution.

The data is a Gaussian mixture whose denoiser E[x_0 | x_t] has a closed form
(`ldm_jax.diffusion.gaussian_mixture`), so that denoiser is a perfect network and the only error
left in a sample is the sampler's own. Each sampler draws `--num-points` points at each NFE
budget, and we report the sliced 2-Wasserstein distance (Rabin et al. 2011) of those points to
the data distribution itself (its exact quantiles along fixed random directions), next to the
noise floor: the same distance for exact samples of the same size. See README.md beside this file
for the question, the settings and the results.

    python experiments/sampler_benchmark/run.py  # ~10 min on 2 CPU cores; writes results/

NFE is counted, not assumed: the network is a host callback that counts its calls
(`host_network`), and a run whose count differs from `network_evaluations` fails.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import pathlib
import sys
import time

# Runnable as a plain script from a checkout: ldm_jax two levels up.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion import samplers, schedules
from ldm_jax.diffusion.gaussian_mixture import GaussianMixture, exact_model_fn

NFE_BUDGETS = (4, 5, 8, 10, 15, 20, 50)
HERE = pathlib.Path(__file__).resolve().parent


# --- The data ------------------------------------------------------------------------------------


def latent_like_mixture(dim: int = 16, num_components: int = 8, seed: int = 0) -> GaussianMixture:
    """A fixed mixture scaled like Stable Diffusion's latents.

    SD multiplies its VAE latents by `scaling_factor` (0.18215 for SD 1.x), chosen to give them
    unit variance (Rombach et al. 2022); the noise schedule's sigmas (0.03 to 14.6 for SD's
    scaled_linear betas) are relative to that. So the mixture is rescaled to unit
    variance per coordinate. Its components are narrow (std 0.21-0.46 for seed 0) and far apart
    (3.6-7.3 between means), of unequal weight (0.07-0.18) and width, so the denoiser is strongly
    nonlinear around the noise level where the component is decided -- the situation where
    few-step samplers go wrong on real data -- and an error in a component's weight or width
    shows up in the distance.
    """
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((num_components, dim))
    stds = rng.uniform(0.1, 0.45, num_components)
    weights = rng.uniform(0.5, 1.5, num_components)
    weights /= weights.sum()
    centered = means - weights @ means
    variance = (weights @ (centered**2).sum(1) + dim * weights @ stds**2) / dim
    scale = 1 / math.sqrt(variance)
    return GaussianMixture(
        weights=jnp.asarray(weights, jnp.float32),
        means=jnp.asarray(means * scale, jnp.float32),
        stds=jnp.asarray(stds * scale, jnp.float32),
    )


def sd_schedule() -> schedules.NoiseSchedule:
    """Stable Diffusion 1.x/2.x's training schedule: scaled_linear betas 0.00085-0.012, T=1000."""
    return schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012)


# --- The contenders ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the table: a registered sampler with options (diffusers' vocabulary).

    schedules: optional {num_steps: sigmas} for the `sigmas` option (an explicit schedule per
    step count); the row then has only the NFE budgets whose step count it lists."""

    label: str
    sampler: str
    options: tuple = ()  # ((key, value), ...), hashable
    stochastic: bool = False
    ours: bool = False  # beyond diffusers: a schedule/setting diffusers does not offer
    schedules: tuple = ()  # ((num_steps, (sigma, ...)), ...)

    def kwargs(self, num_steps: int) -> dict:
        table = dict(self.schedules)
        return dict(self.options) | ({"sigmas": table[num_steps]} if table else {})


def _v(sampler, label=None, stochastic=False, **options):
    return Variant(label or sampler, sampler, tuple(sorted(options.items())), stochastic)


KARRAS = dict(use_karras_sigmas=True)

# Every registered sampler at its defaults (diffusers' class defaults), and with Karras sigmas
# where diffusers' scheduler offers `use_karras_sigmas`. The generic `dpm_solver_multistep` and
# `dpm_solver_singlestep` default to DPM-Solver++ 2M / 2S (the `dpmpp_2m` / `dpmpp_2s` rows), so
# their rows show the noise-prediction DPM-Solver-3 and -1 instead: with them and `dpm_solver`
# (2M) and `dpm_solver_3s` every order of DPM-Solver, single- and multistep, is here. For the
# strongest solvers also diffusers' other schedule switches (exponential / beta sigmas, log-SNR
# uniform `use_lu_lambdas`, "trailing" spacing) and Align Your Steps' SD schedule, which diffusers
# ships (`AysSchedules`) for DPM-Solver++ custom timesteps: the "beyond diffusers" rows must beat
# all of these.
DIFFUSERS_VARIANTS = (
    _v("ddim"),
    _v("ddim", "ddim trailing", timestep_spacing="trailing"),
    _v("pndm"),
    _v("plms"),
    _v("euler"),
    _v("euler", "euler karras", **KARRAS),
    _v("heun"),
    _v("heun", "heun karras", **KARRAS),
    _v("lms"),
    _v("lms", "lms karras", **KARRAS),
    _v("dpm2"),
    _v("dpm2", "dpm2 karras", **KARRAS),
    _v("dpm_solver"),
    _v(
        "dpm_solver_multistep",
        "dpm_solver_multistep 3M",
        algorithm_type="dpmsolver",
        solver_order=3,
        final_sigmas_type="sigma_min",
    ),
    _v("dpm_solver_singlestep", "dpm_solver_singlestep 1S", solver_order=1),
    _v("dpm_solver_3s"),
    _v("dpmpp_2s"),
    _v("dpmpp_2s", "dpmpp_2s karras", **KARRAS),
    _v("dpmpp_2m"),
    _v("dpmpp_2m", "dpmpp_2m karras", **KARRAS),
    _v("dpmpp_2m", "dpmpp_2m exponential", use_exponential_sigmas=True),
    _v("dpmpp_2m", "dpmpp_2m beta", use_beta_sigmas=True),
    _v("dpmpp_2m", "dpmpp_2m lu", use_lu_lambdas=True),
    _v("dpmpp_2m", "dpmpp_2m trailing", timestep_spacing="trailing"),
    _v("dpmpp_3m"),
    _v("dpmpp_3m", "dpmpp_3m karras", **KARRAS),
    _v("unipc"),
    _v("unipc", "unipc karras", **KARRAS),
    _v("unipc", "unipc exponential", use_exponential_sigmas=True),
    _v("unipc", "unipc beta", use_beta_sigmas=True),
    _v("unipc", "unipc 3", solver_order=3),
    _v("deis"),
    _v("deis", "deis karras", **KARRAS),
    # stochastic
    _v("ddpm", stochastic=True),
    _v("ddim", "ddim eta=1", stochastic=True, eta=1.0),
    _v("euler_ancestral", stochastic=True),
    _v("dpm2_ancestral", stochastic=True),
    _v("dpm2_ancestral", "dpm2_ancestral karras", stochastic=True, **KARRAS),
    _v("dpmpp_sde", stochastic=True),
    _v("dpmpp_sde", "dpmpp_sde karras", stochastic=True, **KARRAS),
    _v("dpmpp_2m_sde", stochastic=True),
    _v("dpmpp_2m_sde", "dpmpp_2m_sde karras", stochastic=True, **KARRAS),
    _v("dpmpp_3m_sde", stochastic=True),
    _v("dpmpp_3m_sde", "dpmpp_3m_sde karras", stochastic=True, **KARRAS),
    _v("lcm", stochastic=True),
)

# diffusers' AysSchedules["StableDiffusionTimesteps"] (Align Your Steps, Sabour et al. 2024): the
# 10-step schedule optimized for SD 1.5, run as DPMSolverMultistep's custom timesteps.
AYS_SD_TIMESTEPS = (999, 850, 736, 645, 545, 455, 343, 233, 124, 24)
TUNED_SCHEDULES = HERE / "tuned_schedules.json"


def ays_variant(schedule: schedules.NoiseSchedule) -> Variant:
    """DPM-Solver++(2M) on AYS' SD timesteps: the training sigmas there, as the `sigmas` option."""
    sig = schedules.sigmas_from_alphas_cumprod(np.asarray(schedule.alphas_cumprod, np.float32))
    sigmas = tuple(float(np.float32(sig[t])) for t in AYS_SD_TIMESTEPS)
    return Variant("dpmpp_2m AYS (SD 1.5)", "dpmpp_2m", schedules=((10, sigmas),))


def tuned_variants(path: pathlib.Path = TUNED_SCHEDULES) -> list[Variant]:
    """Beyond diffusers: each solver with its schedules from tune.py (chosen in the tuning
    world, seed 0), one per step count."""
    if not path.exists():
        return []
    tuned = json.loads(path.read_text())
    rows = []
    for solver, entry in tuned.items():
        if solver == "meta":
            continue
        table = tuple(sorted((int(n), tuple(r["sigmas"])) for n, r in entry["schedules"].items()))
        stochastic = solver.endswith("sde")
        rows.append(Variant(f"{solver} tuned sigmas", solver, (), stochastic, True, table))
    return rows


def steps_for_nfe(variant: Variant, budget: int) -> tuple[int, int] | None:
    """(num_steps, NFE) with the most steps whose NFE <= budget (among the step counts the
    variant has schedules for, if any); None when none fits."""
    best = None
    allowed = dict(variant.schedules)
    for n in range(1, budget + 1):
        nfe = samplers.network_evaluations(variant.sampler, n)
        if nfe is not None and nfe <= budget and (not allowed or n in allowed):
            best = (n, nfe)
    if best is not None and allowed and best[1] != budget:
        return None  # a schedule is made for one NFE; do not stand in for another
    return best


# --- Running and measuring -----------------------------------------------------------------------


def host_network(model_fn):
    """(network for the samplers, the list of its calls): `model_fn` compiled once and called
    from each sampler's compiled loop through `jax.pure_callback`, appending to the list at every
    call. So each sampler compiles only its own loop, not the denoiser again (twice as fast
    here), and NFE is the number of calls actually made."""
    compiled = jax.jit(model_fn)
    calls = []

    def host(x, t):
        calls.append(1)
        return np.asarray(compiled(x, t))

    def network(x, t):
        return jax.pure_callback(host, jax.ShapeDtypeStruct(x.shape, x.dtype), x, t)

    return network, calls


def run_variant(variant, steps, setup, noise=None):
    """(samples f32[N, D], counted NFE, seconds including compilation), from `setup.noise`
    unless another `noise` (the sampler's initial x_T) is given."""
    fn = samplers.get_sampler(variant.sampler)
    opts = variant.kwargs(steps)
    setup.calls.clear()
    start = time.perf_counter()
    run = jax.jit(lambda z, k: fn(setup.network, z, setup.schedule, steps, k, **opts))
    x = np.asarray(run(setup.noise if noise is None else noise, setup.rng))
    return x, len(setup.calls), time.perf_counter() - start


def projections(key, dim: int, num: int) -> np.ndarray:
    """float64[dim, num] random unit directions, fixed for a whole run so that every sampler is
    measured along the same ones."""
    d = np.asarray(jax.random.normal(key, (dim, num)), np.float64)
    return d / np.linalg.norm(d, axis=0, keepdims=True)


def sorted_projections(x, dirs: np.ndarray) -> np.ndarray:
    """float64[N, P]: the projections of x: [N, D] on dirs, each column sorted (on the host:
    numpy sorts these columns some 20x faster than XLA:CPU)."""
    return np.sort(np.asarray(x, np.float64) @ dirs, axis=0)


def true_quantiles(gmm: GaussianMixture, dirs: np.ndarray, n: int, grid: int = 16384):
    """float64[n, P]: the exact data distribution's quantiles at levels (i + 1/2) / n along each
    direction. A unit direction u projects the mixture onto the 1-D mixture of N(u . mu_k, s_k^2)
    (isotropic components), whose CDF we tabulate on a fine grid (spacing ~1e-3, a hundredth
    of the narrowest component's std) and invert by linear interpolation."""
    from scipy.special import ndtr

    w, mu, s = (np.asarray(a, np.float64) for a in (gmm.weights, gmm.means, gmm.stds))
    m = mu @ dirs  # [K, P] component means along each direction
    lo, hi = (m - 8 * s[:, None]).min(), (m + 8 * s[:, None]).max()
    y = np.linspace(lo, hi, grid)
    levels = (np.arange(n) + 0.5) / n
    out = np.empty((n, dirs.shape[1]))
    for j in range(dirs.shape[1]):
        cdf = ndtr((y[:, None] - m[None, :, j]) / s[None]) @ w
        keep = np.concatenate([[True], np.diff(cdf) > 0])  # strictly increasing for interp
        out[:, j] = np.interp(levels, cdf[keep], y[keep])
    return out


def sliced_w2(x, quantiles: np.ndarray, dirs: np.ndarray) -> float:
    """Sliced 2-Wasserstein distance (Rabin et al. 2011) of the point cloud x: [N, D] to the
    distribution whose quantiles along `dirs` are `quantiles` ([N, P], levels (i + 1/2) / N):
    the root mean over directions of the squared 1-D W2, which between an N-point sample and a
    distribution is the mean squared difference of its sorted values and those quantiles
    (midpoint rule; as `gaussian_mixture.sliced_wasserstein`, with the true quantiles in place
    of a second sample)."""
    return float(np.sqrt(np.mean((sorted_projections(x, dirs) - quantiles) ** 2)))


@dataclasses.dataclass
class Setup:
    gmm: GaussianMixture
    schedule: schedules.NoiseSchedule
    model_fn: object  # the exact denoiser (`gaussian_mixture.exact_model_fn`)
    network: object  # the same as a counting host callback (`host_network`)
    calls: list
    noise: jnp.ndarray
    rng: jax.Array
    dirs: np.ndarray
    quantiles: np.ndarray  # the data distribution's quantiles along dirs
    floors: list  # SW of exact samples of the same size to the data distribution
    two_sample_floors: list  # SW between two exact samples (the usual two-sample floor)


def make_setup(num_points, dim, num_projections, seed, data_seed=0, floor_samples=4) -> Setup:
    """The evaluation (or tuning) world of one seed: initial noise, sampler rng, projection
    directions, and `floor_samples` exact samples for the noise floor."""
    gmm = latent_like_mixture(dim, seed=data_seed)
    schedule = sd_schedule()
    k_noise, k_rng, k_dirs, *k_exact = jax.random.split(jax.random.key(seed), 3 + floor_samples)
    dirs = projections(k_dirs, dim, num_projections)
    quantiles = true_quantiles(gmm, dirs, num_points)
    exact = [sorted_projections(gmm.sample(k, num_points), dirs) for k in k_exact]
    rms = lambda a, b: float(np.sqrt(np.mean((a - b) ** 2)))
    model_fn = exact_model_fn(gmm, schedule)
    network, calls = host_network(model_fn)
    return Setup(
        gmm=gmm,
        schedule=schedule,
        model_fn=model_fn,
        network=network,
        calls=calls,
        noise=jax.random.normal(k_noise, (num_points, dim)),
        rng=k_rng,
        dirs=dirs,
        quantiles=quantiles,
        floors=[rms(e, quantiles) for e in exact],
        two_sample_floors=[rms(a, b) for a, b in zip(exact[::2], exact[1::2])],
    )


# The probability-flow ODE solved to convergence from the same N(0, I) noise: the limit of every
# deterministic sampler. It lies above the noise floor because SD's schedule does not reach zero
# SNR (alphas_cumprod[999] = 0.0047; Lin et al. 2024): the true x_T is not pure noise, and an
# ODE cannot forget that. Started from exact x_T samples instead, the same ODE reaches the floor.
ODE_LIMIT = _v("unipc", "ODE limit (unipc 3, 100 Karras steps)", solver_order=3, **KARRAS)
ODE_LIMIT_STEPS = 100


def ode_limits(setup: Setup) -> tuple[float, float]:
    """(sliced W2 of the converged ODE from N(0, I), the same from exact samples of x_T)."""
    x, _, _ = run_variant(ODE_LIMIT, ODE_LIMIT_STEPS, setup)
    from_noise = sliced_w2(x, setup.quantiles, setup.dirs)
    abar_t = float(setup.schedule.alphas_cumprod[-1])
    x0 = setup.gmm.sample(jax.random.fold_in(setup.rng, 1), setup.noise.shape[0])
    x_t = np.sqrt(abar_t) * x0 + np.sqrt(1 - abar_t) * setup.noise  # exact q(x_T)
    x, _, _ = run_variant(ODE_LIMIT, ODE_LIMIT_STEPS, setup, noise=x_t)
    return from_noise, sliced_w2(x, setup.quantiles, setup.dirs)


def evaluate(variant, budget, setup: Setup) -> dict | None:
    """One table cell: run `variant` with the most steps whose NFE fits `budget`."""
    fit = steps_for_nfe(variant, budget)
    if fit is None:
        return None
    steps, nfe = fit
    x, counted, seconds = run_variant(variant, steps, setup)
    if counted != nfe:
        raise AssertionError(f"{variant.label}: {steps} steps made {counted} calls, not {nfe}")
    finite = bool(np.all(np.isfinite(x)))
    sw = sliced_w2(x, setup.quantiles, setup.dirs) if finite else math.inf
    return dict(
        label=variant.label,
        sampler=variant.sampler,
        options=variant.kwargs(steps),
        stochastic=variant.stochastic,
        ours=variant.ours,
        nfe_budget=budget,
        steps=steps,
        nfe=counted,
        sw=sw,
        seconds=seconds,
    )


# --- Output --------------------------------------------------------------------------------------


def table(rows: list[dict], budgets, meta: dict) -> str:
    """A Markdown table: one row per variant, one column per NFE budget. A cell is the sliced W2
    x 100; "(n)" marks an actual NFE n below the budget (a sampler that cannot hit it exactly);
    "-" a budget it cannot fit at all. Bold: the best diffusers sampler of the column."""
    by, order = {}, []
    for r in rows:
        if r["label"] not in by:
            order.append(r["label"])
            by[r["label"]] = {}
        by[r["label"]][r["nfe_budget"]] = r
    best = {}
    for b in budgets:
        cells = [by[lab][b] for lab in order if b in by[lab] and not by[lab][b]["ours"]]
        best[b] = min(cells, key=lambda r: r["sw"]) if cells else None
    fmt = lambda v: f"{100 * v:.2f}" if math.isfinite(v) else "nan"
    lines = ["| sampler | " + " | ".join(f"NFE {b}" for b in budgets) + " |"]
    lines.append("|" + " --- |" * (len(budgets) + 1))
    for lab in order:
        cells = []
        for b in budgets:
            r = by[lab].get(b)
            if r is None:
                cells.append("-")
                continue
            text = fmt(r["sw"]) + (f" ({r['nfe']})" if r["nfe"] != b else "")
            cells.append(f"**{text}**" if r is best[b] else text)
        ours = any(r["ours"] for r in by[lab].values())
        lines.append(f"| {'ours: ' if ours else ''}{lab} | " + " | ".join(cells) + " |")
    names = [f"{best[b]['label']}" if best[b] else "-" for b in budgets]
    lines.append("| best diffusers sampler | " + " | ".join(names) + " |")
    for name, key in (
        ("ODE limit (converged from N(0, I))", "ode_limit"),
        ("noise floor (exact samples)", "noise_floor"),
    ):
        lines.append(f"| {name} | " + " | ".join(fmt(meta[key]) for _ in budgets) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], meta: dict, path: pathlib.Path):
    """sliced W2 against NFE, log-log, one panel per kind; ours in black, the noise floor
    dashed, the ODE limit dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(16, 7.5), sharey=True)
    groups = ((False, "deterministic"), (True, "stochastic"))
    colors = plt.get_cmap("tab20").colors
    for ax, (stochastic, title) in zip(axes, groups):
        labels = []
        for r in rows:
            if r["stochastic"] == stochastic and r["label"] not in labels:
                labels.append(r["label"])
        n_ours = 0
        for i, lab in enumerate(labels):
            pts = sorted((r["nfe"], r["sw"]) for r in rows if r["label"] == lab)
            if any(r["ours"] for r in rows if r["label"] == lab):
                style = dict(lw=2.5, color="k", ls=("-", "--", ":")[n_ours % 3])
                n_ours, lab = n_ours + 1, "ours: " + lab
            else:
                style = dict(lw=1.0, color=colors[i % 20], ls=("-", "--", "-.")[i // 20 % 3])
            ax.plot(*zip(*pts), marker="o", ms=3, label=lab, **style)
        ax.axhline(meta["ode_limit"], color="gray", ls=":", lw=1.5, label="ODE limit")
        ax.axhline(meta["noise_floor"], color="gray", ls="--", lw=1, label="noise floor")
        ax.set(xscale="log", yscale="log", xlabel="NFE (network evaluations)", title=title)
        ax.set_xticks(meta["nfe_budgets"], [str(b) for b in meta["nfe_budgets"]])
        ax.minorticks_off()
        ax.set_ylim(meta["noise_floor"] / 1.5, 1.0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    axes[0].set_ylabel("sliced W2 to the data distribution")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(rows, meta, out: pathlib.Path) -> str:
    """results.json (meta + rows), results.csv, table.md, sw_vs_nfe.png; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    keys = ["label", "sampler", "options", "stochastic", "ours", "nfe_budget", "steps", "nfe"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys + ["sw", "seconds"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "options": json.dumps(r["options"], sort_keys=True)})
    text = table(rows, meta["nfe_budgets"], meta)
    (out / "table.md").write_text(text + "\n")
    plot(rows, meta, out / "sw_vs_nfe.png")
    return text


# --- Main ----------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(HERE / "results"), help="folder for the outputs")
    p.add_argument("--num-points", type=int, default=32768)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--num-projections", type=int, default=256)
    p.add_argument("--nfe", default=",".join(map(str, NFE_BUDGETS)), help="NFE budgets")
    p.add_argument("--seed", type=int, default=1, help="evaluation world (tune.py uses 0)")
    p.add_argument("--only", default="", help="comma-separated row labels (default: all)")
    p.add_argument("--tuned", default=str(TUNED_SCHEDULES), help="tune.py's output ('' none)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    budgets = [int(b) for b in args.nfe.split(",")]
    setup = make_setup(args.num_points, args.dim, args.num_projections, args.seed)
    variants = [*DIFFUSERS_VARIANTS, ays_variant(setup.schedule)]
    variants += tuned_variants(pathlib.Path(args.tuned)) if args.tuned else []
    if args.only:
        keep = args.only.split(",")
        unknown = set(keep) - {v.label for v in variants}
        if unknown:
            raise SystemExit(f"unknown rows {sorted(unknown)}; rows: {[v.label for v in variants]}")
        variants = [v for v in variants if v.label in keep]
    floor, spread = float(np.mean(setup.floors)), float(np.std(setup.floors))
    print(
        f"noise floor: sliced W2 of exact samples of {args.num_points} points to the data: "
        f"{floor:.4f} +- {spread:.4f} ({len(setup.floors)} samples); between two exact samples: "
        f"{np.mean(setup.two_sample_floors):.4f}",
        flush=True,
    )
    ode_limit, ode_exact_start = ode_limits(setup)
    print(
        f"ODE limit (the probability-flow ODE converged from N(0, I)): {ode_limit:.4f}; "
        f"from exact samples of x_T: {ode_exact_start:.4f}",
        flush=True,
    )
    rows = []
    start = time.perf_counter()
    for variant in variants:
        for budget in budgets:
            row = evaluate(variant, budget, setup)
            if row is not None:
                rows.append(row)
                print(
                    f"{variant.label:28s} NFE {row['nfe']:3d} ({row['steps']:3d} steps) "
                    f"SW {row['sw']:.4f}  [{row['seconds']:.1f} s]",
                    flush=True,
                )
    meta = dict(
        command="python experiments/sampler_benchmark/run.py " + " ".join(argv or []),
        num_points=args.num_points,
        dim=args.dim,
        num_projections=args.num_projections,
        seed=args.seed,
        nfe_budgets=budgets,
        noise_floor=floor,
        noise_floor_std=spread,
        noise_floor_samples=setup.floors,
        two_sample_floors=setup.two_sample_floors,
        ode_limit=ode_limit,
        ode_limit_from_exact_x_T=ode_exact_start,
        seconds=round(time.perf_counter() - start, 1),
        jax=jax.__version__,
        backend=jax.default_backend(),
        devices=len(jax.devices()),
    )
    out = pathlib.Path(args.out)
    text = write_outputs(rows, meta, out)
    print(text)
    print(f"sliced W2 x 100; {len(rows)} runs in {meta['seconds']:.0f} s; wrote {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
