"""Progressive distillation of the shapes demo model: prompt adherence by number of steps.

    python experiments/distillation/run.py --teacher runs/shapes/ldm --out runs/shapes/distill \
        --rounds 3 --steps-per-round 1000

Round r trains a student of 2^(rounds - r) DDIM steps from the previous round's student (round 1:
from the teacher at 2^rounds steps with guidance 4), each with `configs/shapes.py:distill`. Then
every student (guidance 1: distilled in) and the teacher at the same step counts and at 25
(guidance 4: two network calls a step; DDIM on the same "trailing" grid) are scored on
`ldm-jax eval adherence`'s prompt set with the same seeds. Writes table.md and results.json to --out; README.md has the measured table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ldm_jax.config import load_config
from ldm_jax.eval import adherence
from ldm_jax.model import load_run
from ldm_jax.train import trainer

CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "shapes.py"
COLUMNS = ("color", "shape", "color_and_shape", "position")


def distill_rounds(teacher, out: pathlib.Path, rounds: int, steps_per_round: int, overrides):
    """[(student steps, workdir, training seconds)], fastest student last; reruns resume."""
    done = []
    for r in range(1, rounds + 1):
        steps = 2 ** (rounds - r)
        workdir = out / f"student_{steps}"
        config = load_config(
            f"{CONFIG}:distill",
            [
                f"distill.teacher_workdir={teacher}",
                f"distill.student_steps={steps}",
                f"num_train_steps={steps_per_round}",
                *overrides,
            ],
        )
        start = time.perf_counter()
        trainer.train_and_evaluate(config, workdir)
        done.append((steps, workdir, time.perf_counter() - start))
        teacher = workdir
    return done


def score(workdir, steps: int, guidance: float, args) -> dict:
    model = load_run(workdir)
    result = adherence.evaluate(
        model,
        guidance_scales=(guidance,),
        num_per_prompt=args.num_per_prompt,
        num_steps=steps,
        sampler="ddim",
        sampler_options={"timestep_spacing": "trailing"},
        seed=args.seed,
    )
    return result["rows"][0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="an `ldm` run of configs/shapes.py")
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps-per-round", type=int, default=1000)
    p.add_argument("--num-per-prompt", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--override", action="append", default=[], help="a.b=value for every round")
    args = p.parse_args(argv)
    out = pathlib.Path(args.out)
    students = distill_rounds(args.teacher, out, args.rounds, args.steps_per_round, args.override)
    rows = [{"model": "teacher", "steps": 25, "nfe": 50, **score(args.teacher, 25, 4.0, args)}]
    for steps in [2**k for k in range(args.rounds, -1, -1)]:
        row = score(args.teacher, steps, 4.0, args)
        rows.append({"model": "teacher", "steps": steps, "nfe": 2 * steps, **row})
    for steps, workdir, seconds in students:
        row = score(workdir, steps, 1.0, args)
        rows.append({"model": "student", "steps": steps, "nfe": steps, "train_s": seconds, **row})
    lines = [
        "| model | DDIM steps | U-Net evaluations | color | shape | color+shape | position |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [f"{100 * r[c]:.1f}%" for c in COLUMNS]
        lines.append(f"| {r['model']} | {r['steps']} | {r['nfe']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(table)


if __name__ == "__main__":
    main()
