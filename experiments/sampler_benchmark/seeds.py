"""Is "ours beats every diffusers sampler" more than one seed's luck? Repeat the contenders.

Runs the tuned rows and the strongest diffusers rows of the main table at NFE 4-10 in further
evaluation worlds (fresh initial noise, sampler noise, directions and floor samples; the tuning
world is seed 0, the main table seed 1) and prints, per NFE, each row's sliced W2 per seed and
mean, and the margin of the best tuned row over the best diffusers row in every seed.

    python experiments/sampler_benchmark/seeds.py --seeds 1,2,3,4
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import numpy as np
import run as bench

# The best diffusers rows at NFE 4-10 in the main table, and the usual favourites.
CONTENDERS = (
    "unipc,unipc 3,unipc karras,unipc exponential,deis,deis karras,dpmpp_2m lu,"
    "dpmpp_2m exponential,dpmpp_2m karras,dpmpp_2m AYS (SD 1.5),lms,plms,dpm_solver_multistep 3M"
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="1,2,3,4")
    p.add_argument("--nfe", default="4,5,8,10")
    p.add_argument("--rows", default=CONTENDERS, help="diffusers rows (tuned rows are added)")
    p.add_argument("--num-points", type=int, default=32768)
    p.add_argument("--num-projections", type=int, default=256)
    p.add_argument("--out", default=str(bench.HERE / "results" / "seeds.json"))
    args = p.parse_args(argv)
    budgets = [int(b) for b in args.nfe.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    sw = {}  # (label, budget) -> [sw per seed]
    ours = set()
    floors = []
    for seed in seeds:
        setup = bench.make_setup(args.num_points, 16, args.num_projections, seed)
        floors.append(float(np.mean(setup.floors)))
        variants = [*bench.DIFFUSERS_VARIANTS, bench.ays_variant(setup.schedule)]
        variants = [v for v in variants if v.label in args.rows.split(",")]
        variants += bench.tuned_variants()
        for v in variants:
            ours |= {v.label} if v.ours else set()
            for b in budgets:
                row = bench.evaluate(v, b, setup)
                if row is not None and row["nfe"] == b:
                    sw.setdefault((v.label, b), []).append(row["sw"])
        print(f"seed {seed} done (noise floor {floors[-1]:.4f})", flush=True)
    lines = [
        "| NFE | best diffusers row (mean) | its sliced W2 x 100 per seed | best tuned row | "
        "its sliced W2 x 100 per seed | tuned wins in |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for b in budgets:
        full = {k: v for k, v in sw.items() if k[1] == b and len(v) == len(seeds)}
        mean = lambda labels: min(labels, key=lambda lab: np.mean(full[lab, b]))
        theirs = mean([k[0] for k in full if k[0] not in ours])
        mine = mean([k[0] for k in full if k[0] in ours])
        # per seed: the best tuned row against the best diffusers row *of that seed*
        wins = sum(
            min(full[lab, b][i] for lab in {k[0] for k in full if k[0] in ours})
            < min(full[lab, b][i] for lab in {k[0] for k in full if k[0] not in ours})
            for i in range(len(seeds))
        )
        per = lambda lab: ", ".join(f"{100 * x:.2f}" for x in full[lab, b])
        lines.append(
            f"| {b} | {theirs} ({100 * np.mean(full[theirs, b]):.2f}) | {per(theirs)} | "
            f"{mine} ({100 * np.mean(full[mine, b]):.2f}) | {per(mine)} | {wins}/{len(seeds)} |"
        )
    text = "\n".join(lines)
    print(text)
    print(f"noise floor per seed: {', '.join(f'{100 * f:.2f}' for f in floors)} (x 100)")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            dict(
                seeds=seeds,
                floors=floors,
                sw={f"{lab} @ {b}": v for (lab, b), v in sw.items()},
                table=text,
            ),
            indent=1,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
