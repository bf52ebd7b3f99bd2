"""A LoRA of Stable Diffusion XL base's U-Net on your images.

  ldm-jax train --config configs/sdxl_lora.py --workdir runs/sdxl_lora \
      --config.pretrained=models/stable-diffusion-xl-base-1.0 --config.data.path=/data/my_photos

configs/sdxl_finetune.py (1024 px, SDXL's micro-conditioning and zero unconditional embeddings)
with configs/sd15_lora.py's adapter: rank 4 on the attention projections, lr 1e-4, as diffusers'
train_text_to_image_lora_sdxl.py. `,smoke`: for a tiny random SDXL checkpoint. An untuned
starting point: no result is claimed yet.
"""

import pathlib

from ldm_jax.config import load_config_file

SDXL = pathlib.Path(__file__).with_name("sdxl_finetune.py")
SD15_LORA = pathlib.Path(__file__).with_name("sd15_lora.py")


def get_config(arg=None):
    c = load_config_file(f"{SDXL}:{arg or ''}")
    adapter = load_config_file(f"{SD15_LORA}:{arg or ''}")
    c.unlock()
    for key in ("stage", "lora", "param_groups", "ema_decay"):
        c[key] = adapter[key]
    c.optimizer.learning_rate = adapter.optimizer.learning_rate
    return c
