"""How the demo config was chosen: variants of `configs/shapes.py`, each trained and scored.

    python experiments/demo_config/run.py --out runs/demo_config                  # every variant
    python experiments/demo_config/run.py --out runs/demo_config --only ae_b8_1600 ldm_demo

Each variant is a list of `--config.*` overrides of one stage, trained in its own process with
`ldm-jax train` (as `make demo` does; GLIBC_TUNABLES as in the Makefile) and timed by the
trainer's own "training done in" line: data loading, encoding, compilation and checkpoints
included, the interpreter's start (~5 s) not. Then it is scored:

- autoencoder variants: the mean squared error of 500 reconstructed test images (in [-1, 1]),
  and how often the adherence analyzer (`ldm_jax.eval.adherence.analyze`) reads the same colour
  and shape from a reconstruction as from its original: the analyzer cannot find in a sample a
  shape that the autoencoder cannot reproduce;
- ldm variants, all on the demo autoencoder (`ae_b8_1600`, trained first): `eval adherence` at
  guidance 4, 25 DDIM steps, 8 images for each of the 48 prompts (seed 0, or --eval-seed).

A finished run is not trained again. Writes table.md and results.json to --out; README.md has the
measured table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "shapes.py"
DEMO_AE = "ae_b8_1600"

# name -> (stage, overrides of configs/shapes.py). The demo's own settings: ae_b8_1600, ldm_demo.
BYTES_128 = [
    "tokenizer.name=byte",
    "tokenizer.context_length=77",
    "unet.block_out_channels=(64,128)",
]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "ae_b64_600": ("autoencoder", ["batch_size=64", "num_train_steps=600"]),  # the old demo's
    "ae_b64_300": ("autoencoder", ["batch_size=64", "num_train_steps=300"]),
    "ae_small_b64_600": (
        "autoencoder",
        [
            "batch_size=64",
            "num_train_steps=600",
            "autoencoder.block_out_channels=(8,16,32)",
            "autoencoder.norm_num_groups=4",
        ],
    ),
    "ae_b32_500": ("autoencoder", ["batch_size=32", "num_train_steps=500"]),
    "ae_b32_500_lr6e-3": (
        "autoencoder",
        ["batch_size=32", "num_train_steps=500", "optimizer.learning_rate=6e-3"],
    ),
    "ae_b16_800": ("autoencoder", ["batch_size=16", "num_train_steps=800"]),
    "ae_b16_1000": ("autoencoder", ["batch_size=16", "num_train_steps=1000"]),
    "ae_b8_1200": ("autoencoder", ["num_train_steps=1200"]),
    "ae_b8_1600": ("autoencoder", []),  # the demo's
    "ae_b8_1600_seed1": ("autoencoder", ["seed=1"]),
    "ae_b4_2400": ("autoencoder", ["batch_size=4", "num_train_steps=2400"]),
    "ae_small_b8_1600": (
        "autoencoder",
        ["autoencoder.block_out_channels=(8,16,32)", "autoencoder.norm_num_groups=4"],
    ),
    "ae_small_b8_2400": (
        "autoencoder",
        [
            "autoencoder.block_out_channels=(8,16,32)",
            "autoencoder.norm_num_groups=4",
            "num_train_steps=2400",
        ],
    ),
    # The old demo's text encoder input (bytes) and U-Net, at batch 32 / 16 / 8 in the same time.
    "ldm_bytes_b32_1550": ("ldm", [*BYTES_128, "num_train_steps=1550"]),
    "ldm_bytes_b16_2900": ("ldm", [*BYTES_128, "batch_size=16", "num_train_steps=2900"]),
    "ldm_bytes_b8_4500": (
        "ldm",
        [*BYTES_128, "batch_size=8", "num_train_steps=4500", "optimizer.learning_rate=1.4e-3"],
    ),
    "ldm_bytes_unet32_3000": (
        "ldm",
        [*BYTES_128[:2], "unet.block_out_channels=(32,64)", "unet.norm_num_groups=8"],
    ),
    # Word tokens.
    "ldm_words_128_1550": ("ldm", ["unet.block_out_channels=(64,128)", "num_train_steps=1550"]),
    "ldm_words_128_1700_lr3e-3": (
        "ldm",
        [
            "unet.block_out_channels=(64,128)",
            "num_train_steps=1700",
            "optimizer.learning_rate=3e-3",
        ],
    ),
    "ldm_words_64_2600": ("ldm", ["num_train_steps=2600"]),
    "ldm_demo": ("ldm", []),  # the demo's: word tokens, U-Net (64, 64), 3000 steps
    "ldm_demo_seed1": ("ldm", ["seed=1"]),
}


def train(name: str, out: pathlib.Path, data_dir: str | None) -> float:
    """Trains variant `name` into out/name (log: out/name.log); the seconds the trainer reports
    ("training done in"), or those recorded when the run was already there."""
    stage, overrides = VARIANTS[name]
    workdir = out / name
    if (workdir / "done.json").exists():
        return json.loads((workdir / "done.json").read_text())["seconds"]
    args = ["--config", f"{CONFIG}:{stage}", "--workdir", str(workdir)]
    args += [f"--config.{o}" for o in overrides]
    if stage == "ldm":
        args.append(f"--config.autoencoder_workdir={out / DEMO_AE}")
    if data_dir:
        args.append(f"--config.data.data_dir={data_dir}")
    env = {"WANDB_MODE": "disabled", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", **os.environ}
    log = out / f"{name}.log"
    with open(log, "w") as f:
        command = [sys.executable, "-m", "ldm_jax.cli", "train", *args]
        subprocess.run(command, check=True, env=env, stdout=f, stderr=subprocess.STDOUT)
    found = re.findall(r"training done in ([0-9.]+) s", log.read_text())
    if not found:
        raise RuntimeError(f"{log}: no 'training done in' line")
    seconds = float(found[-1])
    (workdir / "done.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def score_autoencoder(workdir: pathlib.Path, num_images: int = 500) -> dict:
    import jax

    from ldm_jax import images as image_lib
    from ldm_jax.config import read_config
    from ldm_jax.data.pipeline import load_dataset
    from ldm_jax.eval import adherence
    from ldm_jax.models.builders import build_autoencoder
    from ldm_jax.runs import Checkpointer

    config = read_config(workdir / "config.json")
    checkpointer = Checkpointer(workdir, read_only=True)
    params = checkpointer.restore_raw(checkpointer.latest_step())["ema_params"]
    model = build_autoencoder(config)
    images = load_dataset(config, "test")["image"][:num_images]
    x = image_lib.to_model_range(images)
    reconstruct = jax.jit(
        lambda p, x: model.apply(
            p, model.apply(p, x, method=model.encode).mode(), method=model.decode
        )
    )
    recon = np.asarray(reconstruct(params, x))
    same = {"color": 0, "shape": 0}
    for original, copy in zip(images, image_lib.to_uint8(recon)):
        a, b = adherence.analyze(original), adherence.analyze(copy)
        for key in same:
            same[key] += a[key] == b[key]
    return {
        "mse": float(np.mean((recon - x) ** 2)),
        **{f"same_{k}": v / len(images) for k, v in same.items()},
    }


def score_ldm(workdir: pathlib.Path, seed: int) -> dict:
    from ldm_jax.eval import adherence
    from ldm_jax.model import load_run

    result = adherence.evaluate(load_run(workdir), guidance_scales=(4.0,), seed=seed)
    row = result["rows"][0]
    return {k: row[k] for k in ("color", "shape", "color_and_shape", "position")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="a folder for the runs and the table")
    parser.add_argument("--only", nargs="+", choices=tuple(VARIANTS), help="default: all")
    parser.add_argument("--data-dir", help="TFDS data dir (default: the config's)")
    parser.add_argument("--eval-seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(args.only or VARIANTS)
    if any(VARIANTS[n][0] == "ldm" for n in names) and DEMO_AE not in names:
        names.insert(0, DEMO_AE)  # every ldm variant trains on the demo's autoencoder
    rows = []
    for name in names:
        seconds = train(name, out, args.data_dir)
        stage, overrides = VARIANTS[name]
        scores = (
            score_autoencoder(out / name)
            if stage == "autoencoder"
            else score_ldm(out / name, args.eval_seed)
        )
        rows.append(
            {"name": name, "stage": stage, "overrides": overrides, "seconds": seconds, **scores}
        )
        print(json.dumps(rows[-1]), flush=True)
    lines = ["| variant | overrides | train wall | scores |", "|---|---|---:|---|"]
    for r in rows:
        scores = ", ".join(
            f"{k} {v:.4f}" if k == "mse" else f"{k} {100 * v:.1f}%"
            for k, v in r.items()
            if k not in ("name", "stage", "overrides", "seconds")
        )
        lines.append(
            f"| {r['name']} | {' '.join(r['overrides'])} | {r['seconds']:.0f} s | {scores} |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
