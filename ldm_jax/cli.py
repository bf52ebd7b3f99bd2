"""The `ldm-jax` command: a thin layer over library functions that the tests also call.

ldm-jax train  --config configs/shapes.py[:ARG] --workdir DIR [--config.some.field=value ...]
ldm-jax sample --workdir DIR --prompt "a red circle" [--prompt ...] [--negative-prompt ...]
               --num-images N --guidance-scale W --steps S --sampler NAME --seed K --out OUTDIR
ldm-jax eval adherence --workdir DIR [--guidance-scales 0 4] [--num-per-prompt 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
import time

log = logging.getLogger("ldm_jax")


def _train(args, overrides):
    from ldm_jax.config import load_config

    config = load_config(args.config, overrides)
    if config.stage == "autoencoder":
        from ldm_jax.train.autoencoder import train_and_evaluate
    elif config.stage == "ldm":
        from ldm_jax.train.ldm import train_and_evaluate
    else:
        raise ValueError(f"unknown stage {config.stage!r}; valid: autoencoder, ldm")
    start = time.perf_counter()
    train_and_evaluate(config, args.workdir)
    log.info(
        "%s training done in %.1f s; workdir %s",
        config.stage,
        time.perf_counter() - start,
        args.workdir,
    )


def _sample(args, overrides):
    del overrides
    from ldm_jax import pipeline

    if not args.prompt:
        raise ValueError("give at least one --prompt")
    if args.num_images < 1 or args.steps < 1:
        raise ValueError(
            f"--num-images and --steps must be >= 1, got {args.num_images}, {args.steps}"
        )
    negatives = args.negative_prompt or [""]
    if len(negatives) not in (1, len(args.prompt)):
        raise ValueError(f"give one --negative-prompt, or one per --prompt ({len(args.prompt)})")
    if len(negatives) == 1:
        negatives = negatives * len(args.prompt)
    ldm = pipeline.load_from_workdir(args.workdir)
    prompts, negative_prompts, seeds = [], [], []
    for prompt, negative in zip(args.prompt, negatives):
        for _ in range(args.num_images):
            prompts.append(prompt)
            negative_prompts.append(negative)
            seeds.append(args.seed + len(seeds))  # image i uses seed K + i: reproducible alone
    start = time.perf_counter()
    images = pipeline.generate(
        ldm,
        prompts,
        seeds=seeds,
        negative_prompts=negative_prompts,
        guidance_scale=args.guidance_scale,
        num_steps=args.steps,
        sampler=args.sampler,
        batch_size=args.batch_size,
        progress=True,
    )
    seconds = time.perf_counter() - start
    records = [
        {
            "prompt": p,
            "negative_prompt": n,
            "seed": s,
            "sampler": args.sampler,
            "steps": args.steps,
            "guidance_scale": args.guidance_scale,
        }
        for p, n, s in zip(prompts, negative_prompts, seeds)
    ]
    out = pipeline.save_outputs(images, records, args.out, grid_columns=args.num_images)
    print(
        f"wrote {len(images)} images, grid.png and manifest.json to {out} "
        f"({len(images) / seconds:.1f} images/s including compilation)"
    )


def _eval_adherence(args, overrides):
    del overrides
    from ldm_jax import pipeline
    from ldm_jax.eval import adherence

    ldm = pipeline.load_from_workdir(args.workdir)
    out = pathlib.Path(args.out) if args.out else pathlib.Path(args.workdir) / "adherence"
    result = adherence.evaluate(
        ldm,
        guidance_scales=args.guidance_scales,
        num_per_prompt=args.num_per_prompt,
        num_steps=args.steps,
        sampler=args.sampler,
        seed=args.seed,
        batch_size=args.batch_size,
        out_dir=out,
    )
    print(result["table"])
    print(f"(saved to {out})")


def _add_sampling_args(p, steps=25):
    p.add_argument("--workdir", required=True, help="an `ldm` training run")
    p.add_argument("--steps", type=int, default=steps, help="denoising steps (network calls)")
    p.add_argument(
        "--sampler", default="ddim", help="sampler name (see ldm_jax.diffusion.samplers)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="images per compiled batch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm-jax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the stage a config names (autoencoder or ldm)")
    p.add_argument("--config", required=True, help="configs/<name>.py[:arg]")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics and samples go here")
    p.set_defaults(fn=_train, takes_overrides=True)

    p = sub.add_parser("sample", help="text-to-image with a trained model")
    _add_sampling_args(p)
    p.add_argument("--prompt", action="append", default=[], help="repeat for several prompts")
    p.add_argument(
        "--negative-prompt",
        action="append",
        default=[],
        help="one for all prompts, or one per --prompt",
    )
    p.add_argument("--num-images", type=int, default=4, help="images per prompt")
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(fn=_sample)

    p = sub.add_parser("eval", help="evaluations")
    eval_sub = p.add_subparsers(dest="evaluation", required=True)
    p = eval_sub.add_parser("adherence", help="prompt adherence on the shapes prompt set")
    _add_sampling_args(p)
    p.add_argument("--guidance-scales", type=float, nargs="+", default=[0.0, 4.0])
    p.add_argument("--num-per-prompt", type=int, default=8)
    p.add_argument(
        "--out",
        default="",
        help="folder for the table, JSON and grids (default: WORKDIR/adherence)",
    )
    p.set_defaults(fn=_eval_adherence)
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
        build_parser().error(f"--config.* overrides only apply to `train`: {overrides}")

    from ldm_jax.config import ConfigError
    from ldm_jax.pipeline import NoCheckpointError
    from ldm_jax.train.checkpointing import CheckpointMismatchError
    from ldm_jax.train.loop import NonFiniteLossError

    try:
        args.fn(args, overrides)
    except (
        ConfigError,
        CheckpointMismatchError,
        NoCheckpointError,
        NonFiniteLossError,
        FileNotFoundError,
        ValueError,
    ) as e:
        print(f"ldm-jax: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
