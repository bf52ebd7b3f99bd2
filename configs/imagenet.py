"""Text-to-image latent diffusion on ImageNet (ILSVRC2012) at 128x128, captions from class names.

ImageNet cannot be downloaded automatically: put ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar (from https://image-net.org) in one folder and name it:

  ldm-jax train --config configs/imagenet.py:autoencoder --workdir runs/imagenet/autoencoder \
      --config.data.manual_dir=/data/imagenet_tars
  ldm-jax encode --workdir runs/imagenet/autoencoder --config configs/imagenet.py:ldm \
      --config.data.manual_dir=/data/imagenet_tars --out /data/imagenet_latents
  ldm-jax train --config configs/imagenet.py:ldm --workdir runs/imagenet/ldm \
      --config.autoencoder_workdir=runs/imagenet/autoencoder \
      --config.data.precomputed_latents_dir=/data/imagenet_latents

TFDS prepares it once (array_record, ~150 GB) in `config.data.data_dir`; the trainers then read
each batch's examples by index (`in_memory=False`), so batches stay a function of (seed, step).
The ldm stage should read precomputed latents (`ldm-jax encode`): encoding 1.28M images up front
in the trainer would hold all their latents in memory. Captions: "a photo of a tench".
Differences from configs/shapes.py: the data, an f=8 autoencoder (16x16x4 latents) and a wider
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
        raise ValueError(f"configs/imagenet.py: bad argument {arg!r}; use a stage [,smoke]")
    c = load_config_file(f"{SHAPES}:{arg or 'ldm'}")  # shapes' stage, schedule, loss, smoke
    smoke = "smoke" in parts
    with c.unlocked():
        c.data = data_config("imagenet2012", image_size=32 if smoke else 128, in_memory=False)
        c.tokenizer.update(name="byte", context_length=77, vocabulary=())  # open vocabulary
        c.sample.prompts = ("a photo of a goldfish", "a photo of a tabby", "a photo of a volcano")
        if smoke:
            c.sample.prompts = c.sample.prompts[:2]
            return c
        c.autoencoder.update(
            block_out_channels=(64, 128, 256, 256), layers_per_block=2, norm_num_groups=32
        )
        c.text_encoder.update(
            hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4
        )
        c.unet.update(
            block_out_channels=(128, 256, 512),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=2,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        c.optimizer.update(learning_rate=1e-4, warmup_steps=5000)
        c.batch_size = 256 if c.stage == "ldm" else 64
        c.num_train_steps = 400_000 if c.stage == "ldm" else 100_000
        c.ema_decay = 0.9999
        c.log_every, c.checkpoint_every, c.sample_every = 100, 5000, 5000
        c.max_checkpoints_to_keep = 3
    return c
