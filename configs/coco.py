"""Text-to-image latent diffusion on COCO captions (2014 images, Karpathy splits) at 256x256.

  ldm-jax train --config configs/coco.py:autoencoder --workdir runs/coco/autoencoder
  ldm-jax encode --workdir runs/coco/autoencoder --config configs/coco.py:ldm \
      --out /data/coco_latents
  ldm-jax train --config configs/coco.py:ldm --workdir runs/coco/ldm \
      --config.autoencoder_workdir=runs/coco/autoencoder \
      --config.data.precomputed_latents_dir=/data/coco_latents

TFDS downloads COCO 2014 (~20 GB) on first use and prepares `coco_captions/2014` as array_record
in `config.data.data_dir`; training uses train+restval (~113k images), each with its first human
caption, read by index each batch (`in_memory=False`). The CLIP BPE tokenizer suits real captions
better than bytes: `--config.tokenizer.name=clip --config.tokenizer.path=<tokenizer folder>`.
Differences from configs/shapes.py: the data, an f=8 autoencoder (32x32x4 latents) and a wider
U-Net and text encoder. `,smoke` keeps shapes' smoke sizes at 32x32. An untuned starting point:
no result is claimed yet.
"""

import pathlib

from ldm_jax.config import load_config_file
from ldm_jax.data.pipeline import data_config

SHAPES = pathlib.Path(__file__).with_name("shapes.py")


def get_config(arg=None):
    parts = (arg or "ldm").split(",")
    if "64" in parts:
        raise ValueError(f"configs/coco.py: bad argument {arg!r}; use a stage [,smoke]")
    c = load_config_file(f"{SHAPES}:{arg or 'ldm'}")  # shapes' stage, schedule, loss, smoke
    smoke = "smoke" in parts
    with c.unlocked():
        c.data = data_config(
            "coco_captions", config_name="2014", image_size=32 if smoke else 256, in_memory=False
        )
        c.tokenizer.update(name="byte", context_length=77, vocabulary=())  # open vocabulary
        c.sample.prompts = (
            "a man riding a wave on top of a surfboard",
            "a plate of food with broccoli and rice",
            "a red double decker bus driving down a street",
            "a cat sitting on a laptop keyboard",
        )
        if smoke:
            c.sample.prompts = c.sample.prompts[:2]
            return c
        c.autoencoder.update(
            block_out_channels=(64, 128, 256, 256), layers_per_block=2, norm_num_groups=32
        )
        c.text_encoder.update(
            hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8
        )
        c.unet.update(
            block_out_channels=(192, 384, 576, 768),
            down_block_types=(
                "DownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
            ),
            up_block_types=(
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "UpBlock2D",
            ),
            layers_per_block=2,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        c.optimizer.update(learning_rate=1e-4, warmup_steps=5000)
        c.batch_size = 256 if c.stage == "ldm" else 32
        c.num_train_steps = 300_000 if c.stage == "ldm" else 100_000
        c.ema_decay = 0.9999
        c.log_every, c.checkpoint_every, c.sample_every = 100, 5000, 5000
        c.max_checkpoints_to_keep = 3
    return c
