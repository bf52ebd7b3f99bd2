"""SD1.5 U-Net forward with a LoRA: fused (the adapter folded into the kernels) and unfused
(`lora.intercept`, the training form) against the base U-Net, timed in the same run.

The fused U-Net has the base's shapes, so it should cost what the base costs (issue 14: within
3%); the unfused one adds the low-rank branches. Random SD1.5 weights (numpy-drawn), a rank-R
adapter of the attention projections (diffusers' default targets) with a non-zero B; batch 2,
latents --latent x --latent x 4, 77 x 768 context, float32. Medians over --repeats rounds run
round-robin after a warmup round (timing.py); compile times reported separately. Also prints
the adapter's parameter count against the U-Net's (what AdamW keeps two moments of).

    python benchmarks/lora_forward.py --rank 4 --latent 32 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
import numpy as np
from timing import interleaved_times, summary, thread_report

from ldm_jax.models.adapters import lora
from ldm_jax.models.layers import count_params
from ldm_jax.models.unet import unet_from_variant


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--latent", type=int, default=32, help="latent side (64 = 512 px)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(thread_report())

    unet = unet_from_variant("sd15")
    x = jnp.asarray(
        np.random.default_rng(0).normal(size=(2, args.latent, args.latent, 4)), jnp.float32
    )
    t = jnp.array([10.0, 500.0], jnp.float32)
    ctx = jnp.asarray(np.random.default_rng(1).normal(size=(2, 77, 768)), jnp.float32)
    shapes = jax.eval_shape(lambda: unet.init(jax.random.key(0), x, t, ctx))
    rng = np.random.default_rng(2)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s.shape).astype(np.float32) * 0.02), shapes
    )
    adapter = lora.init(params, lora.ATTENTION_TARGETS, args.rank, jax.random.key(3))
    adapter = jax.tree.map(lambda a: a + 0.01, adapter)  # a non-zero B: the branch does work
    print(
        f"U-Net parameters {count_params(params):,}; rank-{args.rank} attention LoRA "
        f"{lora.num_params(adapter):,} ({lora.num_params(adapter) / count_params(params):.3%})"
    )

    base = jax.jit(unet.apply)

    @jax.jit
    def unfused(params, adapter, x, t, ctx):
        with lora.intercept([lora.Adapter(adapter, float(args.rank))]):
            return unet.apply(params, x, t, ctx)

    fused_params = jax.jit(lambda p, a: lora.fuse(p, [lora.Adapter(a, float(args.rank))]))(
        params, adapter
    )
    fns = {
        "base": lambda: base(params, x, t, ctx).block_until_ready(),
        "fused LoRA": lambda: base(fused_params, x, t, ctx).block_until_ready(),
        "unfused LoRA": lambda: unfused(params, adapter, x, t, ctx).block_until_ready(),
    }
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        print(f"{name}: first call (compile + run) {time.perf_counter() - start:.1f} s")
    times = interleaved_times(fns, args.repeats)
    reference = np.median(times["base"])
    for name, seconds in times.items():
        print(
            f"  {name:13s} {summary(seconds)}  ratio to base {np.median(seconds) / reference:.3f}"
        )


if __name__ == "__main__":
    main()
