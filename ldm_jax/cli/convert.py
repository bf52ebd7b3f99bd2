"""`ldm-jax convert`: pretrained weights between layouts (single file, diffusers folder, orbax)."""

from __future__ import annotations

import pathlib
import time

from ldm_jax.cli import args as args_lib


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert", help="pretrained weights between layouts (single file, diffusers, orbax)"
    )
    p.add_argument(
        "source", help="a diffusers folder, single file (.safetensors/.ckpt) or orbax export"
    )
    p.add_argument("--out", required=True, help="a new folder")
    p.add_argument("--to", choices=("diffusers", "orbax"), default="diffusers")
    p.add_argument("--source-variant", help="weights variant to read from a diffusers folder")
    p.add_argument("--variant", help="--to diffusers: weights variant to write, e.g. fp16")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float16"),
        help="--to diffusers: dtype of the written weights",
    )
    p.add_argument("--tokenizer", help="tokenizer folder (single files carry none)")
    p.add_argument("--tokenizer-2", help="second tokenizer folder (SDXL single files)")
    args_lib.add_lora_arg(p)  # fused into the weights that are written
    p.set_defaults(fn=run)


def run(args, overrides):
    """A checkpoint in any layout load_pretrained reads -> a diffusers folder or an orbax export."""
    del overrides
    import numpy as np

    from ldm_jax.convert import load_pretrained, save_orbax, save_pretrained
    from ldm_jax.model import with_lora

    out = pathlib.Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists and is not empty; choose a new folder")
    loras = args_lib.check_lora_files(args)
    start = time.perf_counter()
    model = load_pretrained(
        args.source,
        variant=args.source_variant,
        tokenizer_dir=args.tokenizer,
        tokenizer_2_dir=args.tokenizer_2,
    )
    model = with_lora(model, loras)  # a fused model: the base's layout, the LoRAs folded in
    if args.to == "diffusers":
        save_pretrained(model, out, variant=args.variant, dtype=np.dtype(args.dtype))
    else:
        if args.dtype != "float32":
            raise ValueError("--dtype applies to --to diffusers; orbax exports are float32")
        save_orbax(model, out)
    fused = f" with {len(loras)} LoRA(s) fused" if loras else ""
    print(
        f"converted {model.kind} checkpoint {args.source}{fused} to a {args.to} "
        f"{'folder' if args.to == 'diffusers' else 'checkpoint'} at {out} "
        f"in {time.perf_counter() - start:.1f} s"
    )
