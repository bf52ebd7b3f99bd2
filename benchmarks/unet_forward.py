"""SD1.5 U-Net forward pass: ldm_jax (jit) vs diffusers PyTorch, on the machine it runs on.

Both models have the SD1.5 architecture (runwayml/stable-diffusion-v1-5 `unet/config.json`,
859,520,964 parameters) with the same random weights: diffusers' default init, copied into the
Flax tree with ldm_jax's converter, so the outputs are compared too. Inputs: batch 2, 64x64x4
latents, 77x768 context. Times are medians over --repeats rounds run round-robin after a
warmup round (see timing.py); JAX compile time is reported separately.

    # CPU, float32: JAX with each attention kernel vs PyTorch (SDPA), 5 rounds
    python benchmarks/unet_forward.py --attention xla,chunked --repeats 5

On a GPU (jax.default_backend() == "gpu") it also times bfloat16 with the XLA and the cuDNN
fused attention, and PyTorch on CUDA in float32 and bfloat16. The whole 512 px text-to-image
latency is text_to_image.py's.
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

from ldm_jax.models.unet import unet_from_variant

# runwayml/stable-diffusion-v1-5 unet/config.json (diffusers field names).
SD15_DIFFUSERS_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}


def torch_sd15_unet():
    """diffusers UNet2DConditionModel from the SD1.5 config dict, random init, eval mode."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(SD15_DIFFUSERS_CONFIG).eval()


def jax_params_from_torch(torch_unet) -> dict:
    """The same weights as Flax variables, through ldm_jax's diffusers converter."""
    from ldm_jax.convert.diffusers import convert_state_dict

    state = {k: v.detach().cpu().float().numpy() for k, v in torch_unet.state_dict().items()}
    variables = convert_state_dict("unet", unet_from_variant("sd15"), state)
    del state
    return jax.device_put(variables)


def jax_forward(impl: str, dtype, variables, inputs):
    """(compile seconds, blocking call) for the jitted forward with attention kernel `impl`."""
    model = unet_from_variant("sd15", attention_implementation=impl, dtype=dtype)
    start = time.perf_counter()
    compiled = jax.jit(model.apply).lower(variables, *inputs).compile()
    compile_s = time.perf_counter() - start
    return compile_s, lambda: compiled(variables, *inputs).block_until_ready()


def torch_forward(torch_unet, inputs_np, device: str, dtype_name: str):
    """Blocking call of the diffusers U-Net under torch.no_grad (default SDPA attention)."""
    import torch

    dtype = getattr(torch, dtype_name)
    unet = torch_unet.to(device)
    if dtype != torch.float32:
        unet = unet.to(dtype)
    latents, t, context = inputs_np
    x = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()).to(device, dtype)
    tt = torch.from_numpy(t).to(device)
    ctx = torch.from_numpy(context).to(device, dtype)

    def run():
        with torch.no_grad():
            out = unet(x, tt, encoder_hidden_states=ctx).sample
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (after warmup)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    parser.add_argument(
        "--attention",
        default="auto",
        help="comma-separated JAX attention kernels to time: auto, xla, chunked, cudnn",
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--no-torch", action="store_true", help="skip diffusers/PyTorch")
    parser.add_argument("--no-gpu-extras", action="store_true", help="GPU: float32 part only")
    parser.add_argument(
        "--bf16-attention",
        default="xla,cudnn,chunked",
        help="GPU: comma-separated JAX attention kernels to time in bfloat16",
    )
    args = parser.parse_args(argv)
    # JAX and PyTorch share the GPU: keep XLA from taking 75% of its memory up front (read when
    # the GPU client starts, at the first JAX call below).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    impls = args.attention.split(",")

    backend = jax.default_backend()
    print(f"JAX {jax.__version__} backend {backend}: {jax.devices()[0].device_kind}")
    print(thread_report())
    rng = np.random.default_rng(0)
    inputs_np = (
        rng.normal(size=(args.batch, 64, 64, 4)).astype(np.float32),
        np.linspace(999, 1, args.batch).astype(np.float32),
        rng.normal(size=(args.batch, 77, 768)).astype(np.float32),
    )
    inputs = tuple(jnp.asarray(x) for x in inputs_np)

    start = time.perf_counter()
    if args.no_torch:
        model = unet_from_variant("sd15")
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))
        variables = jax.tree_util.tree_map(
            lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape).astype(np.float32)), shapes
        )
        torch_unet = None
    else:
        import torch

        print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
        if backend == "gpu":  # both frameworks at their defaults; say what those are
            print(
                f"torch TF32: matmul {torch.backends.cuda.matmul.allow_tf32}, "
                f"cudnn {torch.backends.cudnn.allow_tf32}; jax_default_matmul_precision="
                f"{jax.config.jax_default_matmul_precision}"
            )
        torch_unet = torch_sd15_unet()
        variables = jax_params_from_torch(torch_unet)
    print(f"weights built in {time.perf_counter() - start:.0f} s")

    # ---------------------------------------------------------------- float32 forward
    fns, outputs = {}, {}
    for impl in impls:
        compile_s, fn = jax_forward(impl, jnp.float32, variables, inputs)
        print(f"jax[{impl}] float32 compile {compile_s:.1f} s")
        fns[f"jax[{impl}]"] = fn
        outputs[f"jax[{impl}]"] = np.asarray(fn())
    if torch_unet is not None:
        device = "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"
        fns[f"torch[{device}]"] = torch_forward(torch_unet, inputs_np, device, "float32")
        outputs[f"torch[{device}]"] = fns[f"torch[{device}]"]().cpu().numpy().transpose(0, 2, 3, 1)
    report(interleaved_times(fns, args.repeats, args.warmup), outputs, "float32")

    if backend != "gpu" or args.no_gpu_extras:
        return
    # ---------------------------------------------------------------- GPU: bfloat16, cuDNN
    fns, outputs = {}, {}
    for impl in args.bf16_attention.split(","):
        try:
            compile_s, fn = jax_forward(impl, jnp.bfloat16, variables, inputs)
        except Exception as e:  # e.g. no cuDNN flash attention for these shapes: say so, go on
            print(f"jax[{impl}] bfloat16 failed: {type(e).__name__}: {str(e)[:300]}")
            continue
        print(f"jax[{impl}] bfloat16 compile {compile_s:.1f} s")
        fns[f"jax[{impl}]"] = fn
        outputs[f"jax[{impl}]"] = np.asarray(fn(), np.float32)
    if torch_unet is not None and torch.cuda.is_available():
        fns["torch[cuda]"] = torch_forward(torch_unet, inputs_np, "cuda", "bfloat16")
        out = fns["torch[cuda]"]().float().cpu().numpy().transpose(0, 2, 3, 1)
        outputs["torch[cuda]"] = out
    report(interleaved_times(fns, args.repeats, args.warmup), outputs, "bfloat16")


def report(times: dict, outputs: dict, label: str):
    """Medians, ratios JAX/PyTorch and the largest output difference to the first entry."""
    torch_name = next((n for n in times if n.startswith("torch")), None)
    first = next(iter(outputs))
    print(f"--- SD1.5 U-Net forward, {label}, batch {outputs[first].shape[0]}, 64x64x4 latents")
    for name, ts in times.items():
        line = f"{name:14s} {summary(ts)}"
        if torch_name and name != torch_name:
            line += f"  JAX/PyTorch {np.median(ts) / np.median(times[torch_name]):.2f}"
        diff = np.abs(outputs[name].astype(np.float32) - outputs[first].astype(np.float32)).max()
        line += f"  max|out - {first}| {diff:.1e} (|out| max {np.abs(outputs[first]).max():.1f})"
        print(line, flush=True)


if __name__ == "__main__":
    main()
