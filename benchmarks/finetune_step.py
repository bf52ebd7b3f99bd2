"""Fine-tuning gradient step with in-step VAE encoding vs precomputed latents (SD1.5 architecture).

The loss of `ldm_jax.train.objectives.finetune` (`loss_with_draws`: VAE posterior, frozen CLIP text
encoder, noised latents, U-Net, weighted MSE) and its gradient with respect to the U-Net, on
images (the VAE encoder runs in the step, in float32) and on precomputed posteriors (what
`ldm-jax encode --config configs/sd15_finetune.py` stores). Random weights of the SD1.5
architecture (U-Net 859.5M, VAE 83.7M, CLIP ViT-L/14 123.1M parameters); timing does not
depend on their values. Prints XLA's FLOP count of each compiled step and the medians of
interleaved timed runs (timing.py), and their ratios.

    # CPU: 256 px (32x32 latents), batch 1; FLOPs at 512 px need only --cost-only
    python benchmarks/finetune_step.py --size 256 --repeats 3
    python benchmarks/finetune_step.py --size 512 --cost-only
    # CPU check of the script itself on tiny architectures
    python benchmarks/finetune_step.py --tiny --size 32 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Runnable as a plain script from a checkout: timing.py beside it, ldm_jax one level up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
import numpy as np
from timing import interleaved_times, summary, thread_report

from ldm_jax.diffusion.schedules import make_schedule
from ldm_jax.model import Model
from ldm_jax.models.clip import clip_from_variant
from ldm_jax.models.unet import unet_from_variant
from ldm_jax.models.vae import vae_from_variant
from ldm_jax.train.objectives import finetune

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def random_params(module, *args, rng, **kwargs):
    """Variables of `module` with N(0, 0.02) weights (shapes from tracing init, no compute)."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape), s.dtype), shapes)


# (U-Net, VAE, CLIP) variants: SD1.5's, or tiny ones for a CPU check of the script itself.
ARCHITECTURES = {"sd15": ("sd15", "sd", "vit-l-14"), "tiny": ("tiny", "tiny", "tiny")}


def sd15_model(dtype, rng, architecture: str = "sd15") -> Model:
    """An SD1.5-architecture Model with random weights (no tokenizer needed here)."""
    unet_name, vae_name, clip_name = ARCHITECTURES[architecture]
    unet = unet_from_variant(unet_name, dtype=dtype)
    vae = vae_from_variant(vae_name)
    text = clip_from_variant(clip_name, dtype=dtype)
    ids = jnp.zeros((1, 77), jnp.int32)
    context = jnp.zeros((1, 77, unet.cross_attention_dim))
    return Model(
        kind="sd1",
        unet=unet,
        unet_params=random_params(unet, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), context, rng=rng),
        vae=vae,
        vae_params=random_params(vae, jnp.zeros((1, 16, 16, 3)), rng=rng),
        scaling_factor=0.18215,
        text_encoders=(text,),
        text_encoder_params=(random_params(text, ids, rng=rng),),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image side, pixels")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="U-Net, CLIP")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cost-only", action="store_true", help="FLOPs only, nothing run")
    parser.add_argument("--tiny", action="store_true", help="tiny architecture (script check)")
    args = parser.parse_args(argv)

    print(f"JAX {jax.__version__} backend {jax.default_backend()}: {jax.devices()[0].device_kind}")
    print(thread_report())
    rng = np.random.default_rng(0)
    model = sd15_model(DTYPES[args.dtype], rng, "tiny" if args.tiny else "sd15")
    objective = finetune.Objective(
        model=model,
        schedule=make_schedule("scaled_linear", 1000, 0.00085, 0.012),
        prediction_type="epsilon",
        p_uncond=0.1,
        uncond="empty_prompt",
        empty_ids=(np.zeros(77, np.int32),),
        image_size=args.size,
        random_flip=True,
    )
    b = args.batch
    images = rng.integers(0, 256, (b, args.size, args.size, 3), dtype=np.uint8)
    ids = (rng.integers(0, model.text_encoders[0].vocab_size, (b, 77)).astype(np.int32),)
    # The precomputed batch holds these images' own posteriors (what `encode_dataset` stores), so
    # both steps feed the U-Net the same numbers.
    encode = jax.jit(
        lambda x: model.vae.apply(model.vae_params, x / 127.5 - 1.0, method=model.vae.encode)
    )
    plain, mirrored = (
        encode(images.astype(np.float32)),
        encode(images[:, :, ::-1].astype(np.float32)),
    )
    batches = {
        "in-step VAE": {"image": images, "input_ids": ids},
        "precomputed": {
            "latent_mean": plain.mean,
            "latent_std": plain.std,
            "latent_mean_flipped": mirrored.mean,
            "latent_std_flipped": mirrored.std,
            "input_ids": ids,
        },
    }
    frozen = finetune.frozen_params(model)
    draws = finetune.sample_draws(objective, jax.random.key(1), b)

    def grad_fn(params, frozen, batch, draws):
        return jax.grad(lambda p: finetune.loss_with_draws(objective, p, frozen, batch, draws)[0])(
            params
        )

    fns, flops, grads = {}, {}, {}
    for name, batch in batches.items():
        start = time.perf_counter()
        compiled = jax.jit(grad_fn).lower(model.unet_params, frozen, batch, draws).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops[name] = float(cost.get("flops", float("nan")))
        print(
            f"{name:12s} compile {time.perf_counter() - start:5.1f} s, "
            f"{flops[name] / 1e12:.3f} TFLOP per step (XLA cost analysis)",
            flush=True,
        )
        fns[name] = lambda c=compiled, bt=batch: jax.block_until_ready(
            c(model.unet_params, frozen, bt, draws)
        )
        grads[name] = jax.tree.leaves(fns[name]())
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(*grads.values(), strict=True))
    print(f"largest gradient difference between the two: {diff:.1e}")
    del grads
    ratio = flops["in-step VAE"] / flops["precomputed"]
    print(f"--- FLOPs in-step / precomputed: {ratio:.2f} ({args.size} px, batch {b})")
    if args.cost_only:
        return
    times = interleaved_times(fns, args.repeats)
    print(f"--- loss gradient, {args.size} px, batch {b}, U-Net/CLIP {args.dtype}, VAE float32")
    base = np.median(times["precomputed"])
    for name, ts in times.items():
        print(f"{name:12s} {summary(ts)}  ratio to precomputed {np.median(ts) / base:.2f}")


if __name__ == "__main__":
    main()
