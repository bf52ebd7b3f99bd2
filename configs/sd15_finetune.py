"""Fine-tune the U-Net of Stable Diffusion 1.5 (or any SD 1.x / 2.x checkpoint) on your images.

  ldm-jax train --config configs/sd15_finetune.py --workdir runs/sd15_finetune \
      --config.pretrained=models/stable-diffusion-v1-5 --config.data.path=/data/my_photos

`pretrained`: a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
scheduler/), or an original single file such as `v1-5-pruned-emaonly.safetensors` together with
`--config.tokenizer_dir=<the tokenizer/ folder of the diffusers release>`. `data.path`: a folder
of images with same-named .txt captions, or a .csv / .parquet of image paths and captions
(ldm_jax/data/image_caption.py); it is prepared once (resized, center-cropped to
`data.image_size`) as a TFDS dataset in `data.data_dir` and read batch by batch.

The recipe of diffusers' examples/text_to_image/README.md (train_text_to_image.py): 512 px center
crops with random flips, AdamW at a constant lr of 1e-5 without warmup, gradient clipping at 1,
EMA 0.9999 with diffusers' EMA warmup; the noise schedule and prediction type of the checkpoint.
SD 2.1 (768 px, v-prediction) needs only `--config.data.image_size=768`. On GPUs/TPUs keep the
default bfloat16 compute (parameters, optimizer and VAE stay float32). The EMA U-Net is exported
at the end as a diffusers folder:

  ldm-jax sample --pretrained runs/sd15_finetune/export --prompt "..." --out samples/

To run the VAE over the images once rather than in every step (at 512 px its encoder has about
half the FLOPs of the U-Net's forward and backward pass), encode them first with the same
overrides and train on the latents:

  ldm-jax encode --config configs/sd15_finetune.py --config.pretrained=models/stable-diffusion-v1-5 \
      --config.data.path=/data/my_photos --out /data/my_photos_latents
  ldm-jax train ... --config.data.precomputed_latents_dir=/data/my_photos_latents

`,smoke`: 16 px, batch 8, 3 steps in float32, for a tiny random checkpoint (tests/test_finetune.py
builds one); it runs in seconds on a CPU. An untuned starting point: no result is claimed yet.
"""

import pathlib

from ldm_jax.config import load_config_file, param_groups
from ldm_jax.data.pipeline import data_config

COMMON = pathlib.Path(__file__).with_name("common.py")


def get_config(arg=None):
    parts = [p for p in (arg or "").split(",") if p]
    if any(p != "smoke" for p in parts):
        raise ValueError(f"configs/sd15_finetune.py: bad argument {arg!r}; use '' or 'smoke'")
    smoke = "smoke" in parts
    c = load_config_file(str(COMMON))  # mesh, precision, checkpoints, multi-host, wandb
    c.unlock()  # (loaded locked) this config adds its own fields
    c.stage = "finetune"

    # The checkpoint: a diffusers folder or a single file (+ tokenizer folders for single files).
    c.pretrained = ""
    c.variant = ""  # e.g. "fp16": read *.fp16.safetensors (upcast to float32)
    c.tokenizer_dir = ""
    c.tokenizer_2_dir = ""
    # Compute dtype of the U-Net and text encoders ("float32" or "bfloat16"); parameters,
    # gradients, optimizer state and the VAE stay float32.
    c.compute_dtype = "bfloat16"
    c.attention_implementation = ""  # "" = ldm_jax's default; "cudnn" / "xla" (GPU)
    # Memory (configs/common.py and README "Training at scale"): remat_policy, grad_accum_steps;
    # benchmarks/train_memory.py measures them.

    c.data = data_config("image_caption", image_size=512, in_memory=False)
    c.data.random_flip = True  # horizontal flips, drawn per example and step
    # False: center crops (prepared once); True: a random image_size crop of each image (stored
    # resized, uncropped) every step, the diffusers scripts' default without --center_crop.
    c.data.random_crop = False
    # Sharding: configs/common.py, e.g. FSDP --config.mesh.data=2 --config.mesh.fsdp=4.

    c.prediction_type = ""  # "" = the checkpoint's scheduler_config; or epsilon / v_prediction
    # Probability of training on the unconditional input (classifier-free guidance). SD 1.x was
    # trained with 10% dropped captions (CompVis/stable-diffusion model card).
    c.p_uncond = 0.1
    c.uncond = "auto"  # "empty_prompt", "zeros", or "auto": what the checkpoint's pipeline uses
    c.loss_weighting = "none"  # or "min_snr" (Hang et al. 2023) with min_snr_gamma
    c.min_snr_gamma = 5.0
    c.noise_offset = 0.0  # offset noise (Guttenberg 2023); 0.1 in his post; 0 = off

    c.optimizer = dict(
        learning_rate=1e-5,
        warmup_steps=0,
        lr_schedule="constant",  # "constant" (after warmup) or "cosine" (to 10% at the end)
        weight_decay=1e-2,  # torch.optim.AdamW's default, which the diffusers scripts keep
        b1=0.9,
        b2=0.999,
        grad_clip_norm=1.0,
    )
    c.ema_decay = 0.9999  # diffusers' EMAModel default; the loop warms it up as (1+n)/(10+n)
    c.param_groups = param_groups("unet")  # its own optimizer fields / EMA decay, if set
    c.batch_size = 32  # global
    c.num_train_steps = 15_000
    c.max_consecutive_nonfinite = 3  # skipped non-finite updates in a row before stopping
    # Logging, checkpoints (every 1000 steps) and multi-host start-up: configs/common.py.
    c.sample_every = 1000  # a grid of the sample prompts with the EMA U-Net, in <workdir>/samples
    c.sample = dict(
        prompts=(
            "a photo of an astronaut riding a horse on mars",
            "a watercolor painting of a fox in a snowy forest",
            "a bowl of ramen, studio lighting",
            "a red vintage car parked on a cobblestone street",
        ),
        num_inference_steps=25,
        guidance_scale=7.5,
        sampler="",  # "" = the checkpoint's scheduler; or a name from ldm_jax.diffusion.samplers
        seed=0,
    )
    c.export_ema = True  # <workdir>/export gets the EMA U-Net (False: the trained weights)

    if smoke:
        c.compute_dtype = "float32"
        c.data.image_size = 16
        c.batch_size = 8
        c.num_train_steps = 3
        c.optimizer.learning_rate = 1e-4
        c.log_every = 1
        c.checkpoint_every = 2
        c.sample_every = 3
        c.sample.prompts = ("a red circle", "a blue square")
        c.sample.num_inference_steps = 2
        c.wandb.mode = "disabled"
    return c
