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

`--train full,lora` puts full fine-tuning and a LoRA (Hu et al. 2021; rank `--lora-rank`, the
attention projections to_q/to_k/to_v/to_out.0 as diffusers' train_text_to_image_lora.py) side by
side: the LoRA step's arguments hold the frozen U-Net once and AdamW moments of the adapter
only. `--time N` also runs each step N times on random weights and prints the median seconds
(the first call, which compiles, excluded); at SD1.5 size full fine-tuning needs about 14 GiB
for its state, so time it with `--ema 0 --latent-size 32`:

    python benchmarks/train_memory.py --train full,lora --remat none --ema 0 \
        --latent-size 32 --time 3
"""

from __future__ import annotations

import argparse
import itertools
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
import numpy as np

from ldm_jax import sharding as sharding_lib
from ldm_jax.diffusion.objectives import add_noise
from ldm_jax.diffusion.schedules import make_schedule
from ldm_jax.models.adapters import lora
from ldm_jax.models.layers import count_params
from ldm_jax.models.unet import UNet2DConditionModel, unet_from_variant
from ldm_jax.train import state as state_lib

GIB = 2**30
LORA_TARGETS = lora.ATTENTION_TARGETS


def step_memory(
    variant: str,
    remat: str,
    per_device_batch: int,
    layout: dict,
    dtype: str,
    program: str,
    *,
    train: str = "full",
    lora_rank: int = 4,
    ema_decay: float = 0.999,
    latent_size: int = 64,
    time_steps: int = 0,
):
    """(memory_analysis, compile seconds, trainable parameter count, median step seconds or
    None) of one compiled update step (program "step") or of the loss gradient alone (program
    "grad": forward + backward, no optimizer, where remat's saving shows), at a global batch of
    per_device_batch x the data-carrying mesh axes. train "full": the U-Net is the trainable
    group; "lora": the U-Net is frozen and a rank-`lora_rank` adapter of its attention
    projections trains (unfused, `lora.intercept`)."""
    num_devices = 1
    for size in layout.values():
        num_devices *= size
    mesh = sharding_lib.make_mesh(layout, num_devices=num_devices)
    batch = per_device_batch
    for axis in sharding_lib.batch_axes(mesh):
        batch *= mesh.shape[axis]
    unet = unet_from_variant(variant, remat_policy=remat, dtype=jnp.dtype(dtype))
    schedule = make_schedule()
    side = latent_size
    shapes = {
        "latents": jax.ShapeDtypeStruct((batch, side, side, unet.in_channels), jnp.float32),
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
    group = "unet" if train == "full" else "lora"
    groups = {group: state_lib.ParamGroup(state_lib.make_optimizer(opt, 1000), ema_decay)}

    def init_fn():
        x = jnp.zeros((1, side, side, unet.in_channels))
        ctx = jnp.zeros((1, 77, unet.cross_attention_dim))
        unet_params = unet.init(jax.random.key(0), x, jnp.zeros((1,)), ctx)
        if train == "full":
            return state_lib.init_state({"unet": unet_params}, groups)
        adapter = lora.init(unet_params, LORA_TARGETS, lora_rank, jax.random.key(1))
        return state_lib.init_state({"lora": adapter}, groups, frozen={"unet": unet_params})

    def loss_fn(params, frozen, batch, rng):
        k_t, k_eps = jax.random.split(rng)
        z = batch["latents"]
        t = jax.random.randint(k_t, (z.shape[0],), 0, schedule.num_train_timesteps)
        noise = jax.random.normal(k_eps, z.shape)
        x_t = add_noise(z, noise, schedule.alphas_cumprod[t])
        apply = lambda p: unet.apply(p, x_t, t.astype(jnp.float32), batch["context"], True)
        if train == "full":
            pred = apply(params["unet"])
        else:
            with lora.intercept([lora.Adapter(params["lora"])], model=UNet2DConditionModel):
                pred = apply(frozen["unet"])
        return jnp.mean((pred - noise) ** 2), {}

    abstract = jax.eval_shape(init_fn)
    state_shardings = sharding_lib.tree_shardings(abstract, mesh)
    data = sharding_lib.batch_sharding(mesh)
    update = jax.jit(
        state_lib.make_update_fn(
            [state_lib.Phase(loss_fn, (group,), opt.grad_clip_norm)], groups, 0, mesh=mesh
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
            lambda params, frozen, batch: jax.grad(
                lambda p: loss_fn(p, frozen, batch, jax.random.key(0))[0]
            )(params),
            in_shardings=(state_shardings.params, state_shardings.frozen, data),
            out_shardings=state_shardings.params,
        )
        with sharding_lib.activation_sharding(mesh, sharding_lib.DEFAULT_RULES):
            compiled = grad.lower(state_in.params, state_in.frozen, batch_in).compile()
    else:
        compiled = update.lower(state_in, batch_in).compile()
    seconds = time.perf_counter() - start
    step_seconds = None
    if time_steps:
        if program != "step":
            raise ValueError("--time runs the whole step: use it with --program step")
        state = jax.jit(init_fn, out_shardings=state_shardings)()
        rng = np.random.default_rng(0)
        batch_arrays = {
            k: jax.device_put(rng.normal(size=v.shape).astype(np.float32), data)
            for k, v in shapes.items()
        }
        times = []
        for _ in range(time_steps + 1):  # the first call runs; the compile was above
            start = time.perf_counter()
            state, metrics = compiled(state, batch_arrays)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        step_seconds = float(np.median(times[1:]))
        del state
    return compiled.memory_analysis(), seconds, count_params(abstract.params), step_seconds


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
    parser.add_argument(
        "--train",
        default="full",
        help="comma-separated: full (the U-Net trains) and/or lora (a rank --lora-rank adapter "
        "of the attention projections trains, the U-Net frozen)",
    )
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--ema", type=float, default=0.999, help="EMA decay; 0 = no EMA copy")
    parser.add_argument("--latent-size", type=int, default=64, help="latent side (64: 512 px)")
    parser.add_argument(
        "--time", type=int, default=0, help="also run N steps and print the median seconds"
    )
    args = parser.parse_args(argv)
    trains = args.train.split(",")
    if not set(trains) <= {"full", "lora"}:
        raise SystemExit(f"--train takes full and/or lora, got {args.train!r}")
    layouts = [
        {k: int(v) for k, v in (part.split("=") for part in spec.split(","))}
        for spec in (args.layouts or ["data=1"])
    ]
    side = args.latent_size
    print(
        f"{args.variant} U-Net {'train step' if args.program == 'step' else 'loss gradient'}, "
        f"batch {args.batch} per device, {side}x{side} latents, {args.dtype} compute, EMA "
        f"{args.ema:g}, on {jax.default_backend()} ({jax.device_count()} devices); GiB per device"
    )
    print(
        f"{'train':>8s} {'trainable':>12s} {'mesh':>18s} {'remat':>6s} {'arguments':>10s} "
        f"{'temporaries':>12s} {'outputs':>8s} {'aliased':>8s} {'peak est.':>10s} "
        f"{'compile s':>10s}" + (f" {'step s':>8s}" if args.time else "")
    )
    for layout, train, remat in itertools.product(layouts, trains, args.remat.split(",")):
        mem, seconds, n, step_seconds = step_memory(
            args.variant,
            remat,
            args.batch,
            layout,
            args.dtype,
            args.program,
            train=train,
            lora_rank=args.lora_rank,
            ema_decay=args.ema,
            latent_size=side,
            time_steps=args.time,
        )
        peak = (
            mem.argument_size_in_bytes
            + mem.temp_size_in_bytes
            + mem.output_size_in_bytes
            - mem.alias_size_in_bytes
        )
        name = ",".join(f"{k}={v}" for k, v in layout.items())
        label = train if train == "full" else f"lora r{args.lora_rank}"
        print(
            f"{label:>8s} {n:12,d} {name:>18s} {remat:>6s} "
            f"{mem.argument_size_in_bytes / GIB:10.2f} {mem.temp_size_in_bytes / GIB:12.2f} "
            f"{mem.output_size_in_bytes / GIB:8.2f} {mem.alias_size_in_bytes / GIB:8.2f} "
            f"{peak / GIB:10.2f} {seconds:10.1f}"
            + (f" {step_seconds:8.2f}" if step_seconds is not None else ""),
            flush=True,
        )
    print("(peak est. = arguments + temporaries + outputs - aliased)")


if __name__ == "__main__":
    main()
