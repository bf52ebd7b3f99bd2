"""Memory of one U-Net training step, by remat policy and mesh layout (XLA's own accounting).

The step is the trainers' update (`ldm_jax.train.state.make_update_fn`: epsilon-prediction loss,
gradients, clipping, AdamW, EMA) of a U-Net of the chosen variant (default SD1.5: 859,520,964
parameters) at `--batch` latents of 64x64x4 with a 77x768 context. It is lowered from shapes and
compiled, never run, so no weights are allocated; `compiled.memory_analysis()` then gives, per
device: arguments (parameters, EMA, optimizer state, batch), outputs (the new state, aliased to
the donated arguments), and temporaries (the activations kept for the backward pass plus
workspace), which is what remat trades against compute.

    # 8 simulated CPU devices: remat none / full / dots on one device, then FSDP over 8
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/train_memory.py \
        --remat none,full,dots --layouts data=1 --layouts fsdp=8 --batch 1
    # the loss gradient alone (activations: what remat trades for recomputation)
    ... python benchmarks/train_memory.py --program grad --remat none,full,dots --batch 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# XLA:CPU's default scheduler optimizes for concurrency and may hoist a block's recomputation up
# next to its forward pass, which undoes remat (measured: the same temporaries with and without
# it). The memory-minimizing scheduler keeps it late, as GPU/TPU schedulers under memory pressure
# do, so the CPU figures show what remat saves. Set before jax is imported; an explicit value in
# XLA_FLAGS wins.
if "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
    ).strip()

# Runnable as a plain script from a checkout: ldm_jax one level up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import ml_collections

from ldm_jax import sharding as sharding_lib
from ldm_jax.diffusion.objectives import add_noise
from ldm_jax.diffusion.schedules import make_schedule
from ldm_jax.models.layers import count_params
from ldm_jax.models.unet import unet_from_variant
from ldm_jax.train import state as state_lib

GIB = 2**30


def step_memory(
    variant: str, remat: str, per_device_batch: int, layout: dict, dtype: str, program: str
):
    """(memory_analysis, compile seconds, parameter count) of one compiled update step
    (program "step") or of the loss gradient alone (program "grad": forward + backward, no
    optimizer, where remat's saving shows), at a global batch of per_device_batch x the
    data-carrying mesh axes."""
    num_devices = 1
    for size in layout.values():
        num_devices *= size
    mesh = sharding_lib.make_mesh(layout, num_devices=num_devices)
    batch = per_device_batch
    for axis in sharding_lib.batch_axes(mesh):
        batch *= mesh.shape[axis]
    unet = unet_from_variant(variant, remat_policy=remat, dtype=jnp.dtype(dtype))
    schedule = make_schedule()
    shapes = {
        "latents": jax.ShapeDtypeStruct((batch, 64, 64, unet.in_channels), jnp.float32),
        "context": jax.ShapeDtypeStruct((batch, 77, unet.cross_attention_dim), jnp.float32),
    }
    opt = ml_collections.ConfigDict(
        dict(
            learning_rate=1e-5,
            warmup_steps=0,
            lr_schedule="constant",
            weight_decay=0.01,
            b1=0.9,
            b2=0.999,
            grad_clip_norm=1.0,
        )
    )
    groups = {"unet": state_lib.ParamGroup(state_lib.make_optimizer(opt, 1000), 0.999)}

    def init_fn():
        x = jnp.zeros((1, 64, 64, unet.in_channels))
        ctx = jnp.zeros((1, 77, unet.cross_attention_dim))
        params = {"unet": unet.init(jax.random.key(0), x, jnp.zeros((1,)), ctx)}
        return state_lib.init_state(params, groups)

    def loss_fn(params, frozen, batch, rng):
        del frozen
        k_t, k_eps = jax.random.split(rng)
        z = batch["latents"]
        t = jax.random.randint(k_t, (z.shape[0],), 0, schedule.num_train_timesteps)
        noise = jax.random.normal(k_eps, z.shape)
        x_t = add_noise(z, noise, schedule.alphas_cumprod[t])
        pred = unet.apply(params["unet"], x_t, t.astype(jnp.float32), batch["context"], True)
        return jnp.mean((pred - noise) ** 2), {}

    abstract = jax.eval_shape(init_fn)
    state_shardings = sharding_lib.tree_shardings(abstract, mesh)
    data = sharding_lib.batch_sharding(mesh)
    update = jax.jit(
        state_lib.make_update_fn(
            [state_lib.Phase(loss_fn, ("unet",), opt.grad_clip_norm)], groups, 0, mesh=mesh
        ),
        in_shardings=(state_shardings, data),
        out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
        donate_argnums=(0,),
    )
    state_in = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, state_shardings
    )
    batch_in = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=data) for k, v in shapes.items()}
    start = time.perf_counter()
    if program == "grad":
        grad = jax.jit(
            lambda params, batch: jax.grad(lambda p: loss_fn(p, None, batch, jax.random.key(0))[0])(
                params
            ),
            in_shardings=(state_shardings.params, data),
            out_shardings=state_shardings.params,
        )
        with sharding_lib.activation_sharding(mesh, sharding_lib.DEFAULT_RULES):
            compiled = grad.lower(state_in.params, batch_in).compile()
    else:
        compiled = update.lower(state_in, batch_in).compile()
    return compiled.memory_analysis(), time.perf_counter() - start, count_params(abstract.params)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="sd15", help="a row of UNET_VARIANTS")
    parser.add_argument("--remat", default="none,full,dots", help="comma-separated policies")
    parser.add_argument(
        "--batch", type=int, default=1, help="per device: global batch = this x data x fsdp"
    )
    parser.add_argument("--dtype", default="float32", help="compute dtype")
    parser.add_argument(
        "--layouts",
        action="append",
        help="mesh as axis=size,... (e.g. data=1, fsdp=8, data=2,fsdp=4); repeatable",
    )
    parser.add_argument(
        "--program",
        default="step",
        choices=["step", "grad"],
        help="step: the whole update (gradient, clipping, AdamW, EMA); grad: the loss gradient "
        "alone, whose temporaries are the activations kept for the backward pass",
    )
    args = parser.parse_args(argv)
    layouts = [
        {k: int(v) for k, v in (part.split("=") for part in spec.split(","))}
        for spec in (args.layouts or ["data=1"])
    ]
    print(
        f"{args.variant} U-Net {'train step' if args.program == 'step' else 'loss gradient'}, batch {args.batch} per device, 64x64 latents, {args.dtype} "
        f"compute, on {jax.default_backend()} ({jax.device_count()} devices); GiB per device"
    )
    print(
        f"{'mesh':>18s} {'remat':>6s} {'arguments':>10s} {'temporaries':>12s} "
        f"{'outputs':>8s} {'aliased':>8s} {'peak est.':>10s} {'compile s':>10s}"
    )
    for layout in layouts:
        for remat in args.remat.split(","):
            mem, seconds, n = step_memory(
                args.variant, remat, args.batch, layout, args.dtype, args.program
            )
            peak = (
                mem.argument_size_in_bytes
                + mem.temp_size_in_bytes
                + mem.output_size_in_bytes
                - mem.alias_size_in_bytes
            )
            name = ",".join(f"{k}={v}" for k, v in layout.items())
            print(
                f"{name:>18s} {remat:>6s} {mem.argument_size_in_bytes / GIB:10.2f} "
                f"{mem.temp_size_in_bytes / GIB:12.2f} {mem.output_size_in_bytes / GIB:8.2f} "
                f"{mem.alias_size_in_bytes / GIB:8.2f} {peak / GIB:10.2f} {seconds:10.1f}",
                flush=True,
            )
    print(f"({n:,} U-Net parameters; peak est. = arguments + temporaries + outputs - aliased)")


if __name__ == "__main__":
    main()
