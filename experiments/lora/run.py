"""Teach the shapes demo model a held-out concept with LoRA (ranks 4, 16, 64) or full fine-tuning,
and score what it learned and what it forgot.

    python experiments/lora/run.py --base runs/shapes/ldm --out runs/shapes/lora

For each held-out concept of the dataset (`cross`, a shape; `navy`, a colour: 512 examples that
all have it, `configs/shapes.py:lora,<concept>` / `finetune,<concept>`; with `,replay`, 1024
examples of which every second one is of the main distribution), each method and each seed, one
run of `--steps` steps from the `--base` run; then, with the same sampling seeds for every row (`ldm-jax eval adherence`'s prompt sets, DDIM 25 steps, guidance 4):

- new: the concept's prompts (`--concept cross`: the 8 colours x cross; `navy`: navy x the 3
  shapes; short and canonical captions), color+shape and the concept's own attribute;
- old: the base prompt set (8 colours x 3 shapes), color+shape, against the base model's score
  (what the adaptation forgot);
- the ceiling: the concept's renders through the frozen autoencoder (encode, decode), which
  never saw the concept either: what its decoder can draw, whatever the U-Net does;
- trainable parameters, the size of what is written (the LoRA file; the fine-tuned U-Net in
  float32), the median training speed (steps/s of the logging windows after the first) and
  the run's seconds (compilation and the two sample grids included).

Then the two LoRAs of the first seed at `--combine-rank`, fused together with weights, on the
prompts that have both concepts ("a navy cross"). Writes table.md and results.json to --out;
rerunning reuses finished runs and scores.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax
import numpy as np

from ldm_jax.config import load_config
from ldm_jax.convert.lora import read_lora
from ldm_jax.data import shapes
from ldm_jax.eval import adherence
from ldm_jax.model import load_run, with_lora
from ldm_jax.models.adapters.lora import num_params
from ldm_jax.models.layers import count_params
from ldm_jax.train import trainer

CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "shapes.py"
LORA_FILE = "pytorch_lora_weights.safetensors"
TEXT_ENCODER_TARGETS = "('q_proj','k_proj','v_proj','out_proj')"


def methods(ranks, text_encoder_rank, replay_rank) -> list[tuple[str, str, list[str]]]:
    """(name, config argument, overrides) of every method."""
    out = [(f"LoRA r{r}", "lora", [f"lora.rank={r}", f"lora.alpha={float(r)}"]) for r in ranks]
    if text_encoder_rank:
        r = text_encoder_rank
        overrides = [f"lora.rank={r}", f"lora.alpha={float(r)}"]
        overrides.append(f"lora.text_encoder_targets={TEXT_ENCODER_TARGETS}")
        out.append((f"LoRA r{r} + text encoder", "lora", overrides))
    out.append(("full fine-tuning", "finetune", []))
    if replay_rank:
        r = replay_rank
        out.append((f"LoRA r{r}, replay", "lora,replay", [f"lora.rank={r}", f"lora.alpha={r}."]))
        out.append(("full fine-tuning, replay", "finetune,replay", []))
    return out


def train(base, workdir: pathlib.Path, concept, arg, overrides, seed, steps) -> float:
    """Training seconds (read back from a finished run's record)."""
    record = workdir / "experiment_train.json"
    if record.is_file():
        return json.loads(record.read_text())["seconds"]
    config = load_config(
        f"{CONFIG}:{arg},{concept}",
        [f"pretrained={base}", f"seed={seed}", f"num_train_steps={steps}", *overrides],
    )
    start = time.perf_counter()
    trainer.train_and_evaluate(config, workdir)
    seconds = time.perf_counter() - start
    record.write_text(json.dumps({"seconds": seconds}) + "\n")
    return seconds


def score(model, concepts, args) -> dict:
    result = adherence.evaluate(
        model,
        guidance_scales=(args.guidance,),
        num_per_prompt=args.num_per_prompt,
        num_steps=25,
        sampler="ddim",
        seed=args.eval_seed,
        concepts=concepts,
    )
    return result["rows"][0]


def median_steps_per_sec(workdir: pathlib.Path) -> float:
    """The median of the run's logged training speeds after its first window (which includes
    compilation): a robust figure when other jobs share the machine for a while."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    speeds = [json.loads(line).get("steps_per_sec") for line in lines[1:]]
    return float(np.median([s for s in speeds if s is not None]))


def round_trip(model, concept, num: int = 256) -> dict:
    """Scores of the concept's renders passed through the frozen autoencoder (encode, decode):
    what the decoder, which never saw the concept, can draw at all, the ceiling of any
    adaptation of the U-Net alone."""
    examples = [e for _, e in shapes.generate_examples(1, num, 32, concept)]
    images = np.stack([e["image"] for e in examples]).astype(np.float32) / 127.5 - 1.0
    vae = model.vae
    posterior = jax.jit(lambda p, x: vae.apply(p, x, method=vae.encode))(model.vae_params, images)
    decoded = jax.jit(lambda p, z: vae.apply(p, z, method=vae.decode))(
        model.vae_params, posterior.mean
    )
    decoded = np.asarray(np.clip((np.asarray(decoded) + 1.0) * 127.5, 0, 255).round(), np.uint8)
    records = [{k: n[e[k]] for k, n in shapes.LABEL_NAMES.items()} for e in examples]
    return adherence.score([adherence.analyze(x) for x in decoded], records)


def cached(path: pathlib.Path, fn):
    if path.is_file():
        return json.loads(path.read_text())
    value = fn()
    path.write_text(json.dumps(value, indent=2) + "\n")
    return value


def percent(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="an `ldm` run of configs/shapes.py")
    p.add_argument("--out", required=True)
    p.add_argument("--concepts", nargs="+", default=list(shapes.CONCEPTS))
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--text-encoder-rank", type=int, default=16, help="0: no such row")
    p.add_argument(
        "--replay-rank",
        type=int,
        default=16,
        help="rows of LoRA (this rank) and full fine-tuning on data that replays the main "
        "distribution half of the time; 0: none",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--replay-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--combine-rank", type=int, default=16)
    p.add_argument("--combine-weights", type=float, nargs="+", default=[1.0, 0.7])
    p.add_argument("--num-per-prompt", type=int, default=8)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--eval-seed", type=int, default=0)
    args = p.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_run(args.base)
    unet_size = count_params(base.unet_params)

    rows = []
    old_base = cached(out / "base_old.json", lambda: score(base, (), args))
    for concept in args.concepts:
        new = cached(out / f"base_{concept}.json", lambda c=concept: score(base, (c,), args))
        ceiling = cached(out / f"round_trip_{concept}.json", lambda c=concept: round_trip(base, c))
        rows.append(dict(concept=concept, method="autoencoder round trip", seed=None, new=ceiling))
        rows.append(dict(concept=concept, method="base model", seed=None, new=new, old=old_base))
        for name, arg, overrides in methods(args.ranks, args.text_encoder_rank, args.replay_rank):
            for seed in args.replay_seeds if "replay" in arg else args.seeds:
                tag = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
                workdir = out / f"{concept}_{tag}_seed{seed}"
                seconds = train(args.base, workdir, concept, arg, overrides, seed, args.steps)
                if arg.startswith("lora"):
                    file = workdir / LORA_FILE
                    model = with_lora(base, [file])
                    trainable = sum(num_params(a.params) for a in read_lora(file).values())
                    size = file.stat().st_size
                else:
                    model = load_run(workdir)
                    trainable, size = unet_size, 4 * unet_size
                new = cached(workdir / "score_new.json", lambda: score(model, (concept,), args))
                old = cached(workdir / "score_old.json", lambda: score(model, (), args))
                rows.append(
                    dict(
                        concept=concept,
                        method=name,
                        seed=seed,
                        new=new,
                        old=old,
                        trainable=trainable,
                        bytes=size,
                        seconds=seconds,
                        steps_per_sec=median_steps_per_sec(workdir),
                    )
                )
                jax.clear_caches()

    combined = []
    if len(args.concepts) == 2:
        both = tuple(args.concepts)
        combined.append(
            dict(
                loras="none (base)",
                score=cached(out / "both_base.json", lambda: score(base, both, args)),
            )
        )
        tags = [f"lora_r{args.combine_rank}"]
        tags += [f"lora_r{args.combine_rank}_replay"] if args.replay_rank else []
        for tag in tags:
            files = [out / f"{c}_{tag}_seed{args.seeds[0]}" / LORA_FILE for c in both]
            suffix = "" if tag.endswith(f"r{args.combine_rank}") else "_replay"
            label = ", replay" if suffix else ""
            for c, file in zip(both, files, strict=True):
                combined.append(
                    dict(
                        loras=f"{c}{label} 1.0",
                        score=cached(
                            out / f"both_{c}{suffix}.json",
                            lambda f=file: score(with_lora(base, [f]), both, args),
                        ),
                    )
                )
            for w in args.combine_weights:
                model = with_lora(base, [(f, w) for f in files])
                combined.append(
                    dict(
                        loras=" + ".join(f"{c}{label} {w:g}" for c in both),
                        score=cached(
                            out / f"both_{w:g}{suffix}.json", lambda m=model: score(m, both, args)
                        ),
                    )
                )

    table = format_tables(rows, combined)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(
        json.dumps({"settings": vars(args), "rows": rows, "combined": combined}, indent=2) + "\n"
    )
    print(table)


def format_tables(rows, combined) -> str:
    lines = [
        "| concept | method | seed | new: concept | new: color+shape | old: color+shape | "
        "trainable parameters | written | steps/s | training s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        attribute = shapes.CONCEPTS[r["concept"]][0]
        size = "-" if "bytes" not in r else f"{r['bytes'] / 2**20:.2f} MiB"
        cells = [
            r["concept"],
            r["method"],
            "-" if r["seed"] is None else str(r["seed"]),
            percent(r["new"][attribute]),
            percent(r["new"]["color_and_shape"]),
            percent(r["old"]["color_and_shape"]) if "old" in r else "-",
            f"{r['trainable']:,}" if "trainable" in r else "-",
            size,
            f"{r['steps_per_sec']:.2f}" if "steps_per_sec" in r else "-",
            f"{r['seconds']:.0f}" if "seconds" in r else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if combined:
        lines += [
            "",
            "| LoRAs fused | color | shape | color+shape |",
            "|---|---:|---:|---:|",
        ]
        for c in combined:
            s = c["score"]
            cells = [c["loras"], percent(s["color"]), percent(s["shape"])]
            lines.append("| " + " | ".join([*cells, percent(s["color_and_shape"])]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
