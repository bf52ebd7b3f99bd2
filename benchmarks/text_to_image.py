"""Text-to-image latency, ldm_jax vs diffusers PyTorch, on one SD1.5-architecture checkpoint.

A random-initialized diffusers `StableDiffusionPipeline` with the SD1.5 architecture (U-Net
859,520,964 parameters, the SD VAE, CLIP ViT-L/14 text encoder; real CLIP tokenizer files) is
saved as a diffusers folder and loaded back with `ldm_jax.model.load_pretrained`, so both
frameworks run the same weights. Each call is one whole text-to-image generation: tokenize,
encode the prompt and the empty negative prompt, `--steps` DDIM steps with classifier-free
guidance (U-Net batch 2 per image), VAE decode, uint8 images on the host. Both sides start from
the same initial latents, so the images are compared too (max difference in 8-bit levels).
Times are medians of `--repeats` round-robin rounds after a warmup (see timing.py); the JAX
compile time is reported apart.

    # GPU: float32 and bfloat16, 512 px, 20 steps
    python benchmarks/text_to_image.py --tokenizer ../shared/data/clip_tokenizer
    # CPU smoke check of the script itself on a tiny architecture
    python benchmarks/text_to_image.py --tiny --size 64 --steps 2 --dtypes float32 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

# Runnable as a plain script from a checkout: timing.py beside it, ldm_jax one level up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax
import jax.numpy as jnp
import numpy as np
from timing import interleaved_times, summary

from ldm_jax.model import load_pretrained
from ldm_jax.pipeline import generate, initial_noise

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5

# runwayml/stable-diffusion-v1-5: unet/, vae/ and text_encoder/ config.json (diffusers and
# transformers field names); "tiny" shrinks every width and depth for a CPU check of the script.
ARCHITECTURES = {
    "sd15": {
        "unet": dict(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            layers_per_block=2,
            attention_head_dim=8,
            cross_attention_dim=768,
        ),
        "vae": dict(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        ),
        "text_encoder": dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
        ),
    },
    "tiny": {
        "unet": dict(
            sample_size=8,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            attention_head_dim=8,
            cross_attention_dim=32,
        ),
        "vae": dict(
            block_out_channels=(32, 32, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            latent_channels=4,
        ),
        "text_encoder": dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1
        ),
    },
}


def torch_pipeline(architecture: str, tokenizer_dir: str):
    """A random diffusers StableDiffusionPipeline of `architecture`, DDIM with SD's schedule."""
    import diffusers
    import torch
    import transformers

    arch = ARCHITECTURES[architecture]
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(in_channels=4, out_channels=4, **arch["unet"])
    vae = diffusers.AutoencoderKL(**arch["vae"])
    text_config = transformers.CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
        **arch["text_encoder"],
    )
    text_encoder = transformers.CLIPTextModel(text_config)
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return diffusers.StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(tokenizer_dir),
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tokenizer",
        default=os.path.join(os.path.dirname(REPO), "shared", "data", "clip_tokenizer"),
        help="folder with the CLIP tokenizer files (vocab.json, merges.txt, ...)",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny architecture (script check)")
    parser.add_argument("--size", type=int, default=512, help="image height and width, pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes to time")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true", help="skip diffusers/PyTorch timing")
    args = parser.parse_args(argv)
    # JAX and PyTorch share the GPU: keep XLA from taking 75% of its memory up front (read when
    # the GPU client starts, at the first JAX call below).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

    import torch

    backend = jax.default_backend()
    device = "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"
    print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__}")
    print(f"{args.size} px, {args.steps} DDIM steps, guidance {GUIDANCE}, batch 1 (U-Net batch 2)")
    start = time.perf_counter()
    pipe = torch_pipeline("tiny" if args.tiny else "sd15", args.tokenizer)
    pipe.set_progress_bar_config(disable=True)
    print(f"diffusers pipeline built in {time.perf_counter() - start:.0f} s")

    latent = args.size // 8
    noise = initial_noise([0], (latent, latent, 4))  # NHWC
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        pipe.save_pretrained(folder, safe_serialization=True)
        print(f"saved as a diffusers folder in {time.perf_counter() - start:.0f} s")
        models = {}
        for name in args.dtypes.split(","):
            start = time.perf_counter()
            sd = load_pretrained(folder, dtype=jnp.dtype(name))
            models[name] = sd
            print(f"ldm_jax load_pretrained in {time.perf_counter() - start:.0f} s ({name})")

    def jax_call(sd):
        return lambda: generate(
            sd,
            PROMPT,
            num_inference_steps=args.steps,
            guidance_scale=GUIDANCE,
            height=args.size,
            width=args.size,
            latents=noise,
            sampler="ddim",
            batch_size=1,
        )

    def torch_call(dtype_name):
        dtype = getattr(torch, dtype_name)
        pipe_d = pipe.to(device, dtype)
        latents = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()).to(device, dtype)

        def run():
            with torch.no_grad():
                out = pipe_d(
                    PROMPT,
                    num_inference_steps=args.steps,
                    guidance_scale=GUIDANCE,
                    height=args.size,
                    width=args.size,
                    latents=latents,
                    output_type="np",
                )
            return np.round(np.asarray(out.images) * 255).astype(np.uint8)

        return run

    for name, sd in models.items():
        fns, images = {}, {}
        fns[f"jax {name}"] = jax_call(sd)
        start = time.perf_counter()
        images[f"jax {name}"] = fns[f"jax {name}"]()
        print(f"jax {name}: first call (compile + run) {time.perf_counter() - start:.1f} s")
        if not args.no_torch:
            fns[f"torch[{device}] {name}"] = torch_call(name)
            images[f"torch[{device}] {name}"] = fns[f"torch[{device}] {name}"]()
        times = interleaved_times(fns, args.repeats)
        torch_name = next((n for n in times if n.startswith("torch")), None)
        first = next(iter(images))
        print(f"--- text-to-image, {name}")
        for key, ts in times.items():
            line = f"{key:22s} {summary(ts)}"
            if torch_name and key != torch_name:
                line += f"  JAX/PyTorch {np.median(ts) / np.median(times[torch_name]):.2f}"
            diff = np.abs(images[key].astype(int) - images[first].astype(int))
            line += f"  image max|diff| to {first}: {diff.max()} levels, mean {diff.mean():.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
