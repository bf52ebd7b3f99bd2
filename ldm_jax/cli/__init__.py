"""The `ldm-jax` command: a thin layer over library functions that the tests also call.

ldm-jax train  --config configs/shapes.py[:ARG] --workdir DIR [--config.some.field=value ...]
ldm-jax sample (--workdir RUN | --pretrained PATH [--tokenizer DIR]) --prompt "a red circle"
               [--prompt ...] [--negative-prompt ...] --num-images N --guidance-scale W --steps S
               --sampler NAME --seed K [--height H --width W] [--guidance-rescale R]
               [--init-image IMG [--strength S]] [--mask MASK]
               [--refiner REFINER --denoising-end 0.8] --out OUTDIR
ldm-jax convert SRC --out DIR [--to diffusers|orbax] [--variant fp16 --dtype float16] [--lora FILE[:W]]
ldm-jax encode --workdir AE_RUN --config configs/shapes.py:ldm --out DIR [--config.a.b=value ...]
ldm-jax encode --config configs/sd15_finetune.py --config.pretrained=P --config.data.path=D --out DIR
ldm-jax eval adherence --workdir DIR [--guidance-scales 0 4] [--num-per-prompt 8] [--concept cross]
    [--lora FILE[:WEIGHT]] [--out FILE]
ldm-jax eval fid --workdir DIR --inception-weights W [--sampler ddim dpmpp_2m] [--steps 10 20]
ldm-jax eval fid --images DIR --reference STATS.npz --inception-weights W
ldm-jax eval fid-reference (--images DIR | --config CFG) --inception-weights W --out STATS.npz
ldm-jax eval clip-score --images DIR --clip CLIP_FOLDER

One module per command (train.py, sample.py, convert.py, encode.py, eval.py), each parsing its
arguments and calling a library function that the tests also call; args.py: the checks they share.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ldm_jax.cli import convert, encode, sample, train
from ldm_jax.cli import eval as eval_cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm-jax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (train, sample, convert, encode, eval_cmd):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    # orbax reports routine events (e.g. opening a read-only checkpoint) as absl warnings.
    for noisy in ("absl", "orbax", "jax._src", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    argv = sys.argv[1:] if argv is None else argv
    # `--config.a.b=value` overrides are collected here; argparse would reject them.
    overrides = [a[len("--config.") :] for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    args = build_parser().parse_args(rest)
    if overrides and not getattr(args, "takes_overrides", False):
        build_parser().error(f"--config.* overrides only apply to train/encode: {overrides}")

    from ldm_jax.config import ConfigError
    from ldm_jax.runs import CheckpointMismatchError, NoCheckpointError
    from ldm_jax.train.loop import NonFiniteLossError, Preempted

    try:
        args.fn(args, overrides)
    except Preempted as e:  # a clean stop: the state is saved, rerunning resumes
        print(f"ldm-jax: {e}", file=sys.stderr)
        return 0
    except (
        ConfigError,
        CheckpointMismatchError,
        NoCheckpointError,
        NonFiniteLossError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
    ) as e:
        print(f"ldm-jax: error: {e}", file=sys.stderr)
        return 2
    return 0
