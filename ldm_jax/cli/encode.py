"""`ldm-jax encode`: a dataset's VAE latents and caption tokens, precomputed once."""

from __future__ import annotations

import time


def add_parser(sub) -> None:
    p = sub.add_parser("encode", help="precompute a dataset's VAE latents and caption tokens")
    p.add_argument(
        "--workdir",
        help="an autoencoder (or ldm) run: its VAE (a finetune config uses config.pretrained's)",
    )
    p.add_argument("--config", required=True, help="configs/<name>.py[:arg]: data, tokenizer")
    p.add_argument("--out", required=True, help="output folder (a TFDS dataset and meta.json)")
    p.add_argument("--split", default="train", choices=("train", "test"))
    p.add_argument(
        "--batch-size", type=int, help="images per encoder call (256; finetune configs 16)"
    )
    p.set_defaults(fn=run, takes_overrides=True)


def run(args, overrides):
    from ldm_jax.config import load_config
    from ldm_jax.data import latents

    config = load_config(args.config, overrides)
    start = time.perf_counter()
    if config.stage == "finetune":  # the VAE of config.pretrained; its train split
        from ldm_jax.train.objectives import finetune

        if args.workdir or args.split != "train":
            raise ValueError(
                "a finetune config encodes the train split with the VAE of "
                "config.pretrained; drop --workdir and --split"
            )
        meta = finetune.encode_dataset(config, args.out, batch_size=args.batch_size or 16)
    elif not args.workdir:
        raise ValueError(
            f"--workdir (the autoencoder run whose VAE encodes) is required for "
            f"a {config.stage} config"
        )
    else:
        meta = latents.encode(
            config, args.workdir, args.out, split=args.split, batch_size=args.batch_size or 256
        )
    print(
        f"encoded {meta['num_examples']} examples of {config.data.name}/{args.split} to "
        f"{args.out} in {time.perf_counter() - start:.1f} s; train on them with "
        f"--config.data.precomputed_latents_dir={args.out}"
    )
