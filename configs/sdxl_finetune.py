"""Fine-tune the U-Net of Stable Diffusion XL base on your images.

  ldm-jax train --config configs/sdxl_finetune.py --workdir runs/sdxl_finetune \
      --config.pretrained=models/stable-diffusion-xl-base-1.0 --config.data.path=/data/my_photos

configs/sd15_finetune.py with SDXL's differences: 1024 px, and the settings of diffusers'
examples/text_to_image/README_sdxl.md (train_text_to_image_sdxl.py): lr 1e-6 (constant, no
warmup) and 20% dropped captions. Dropped captions get zero text embeddings (`uncond="auto"`), the
unconditional input the SDXL base pipeline uses (`force_zeros_for_empty_prompt`); each example's
original size and crop corner are its micro-conditioning (recorded by the image_caption builder).
A single-file checkpoint (`sd_xl_base_1.0.safetensors`) also needs `--config.tokenizer_dir` and
`--config.tokenizer_2_dir`. The export samples with

  ldm-jax sample --pretrained runs/sdxl_finetune/export --prompt "..." --out samples/

`,smoke`: sd15_finetune's smoke sizes, for a tiny random SDXL checkpoint (tests/test_finetune.py).
An untuned starting point: no result is claimed yet.
"""

import pathlib

from ldm_jax.config import load_config_file

SD15 = pathlib.Path(__file__).with_name("sd15_finetune.py")


def get_config(arg=None):
    c = load_config_file(f"{SD15}:{arg or ''}")  # its argument check, defaults and smoke sizes
    with c.unlocked():
        c.p_uncond = 0.2
        if "smoke" in (arg or "").split(","):
            return c
        c.data.image_size = 1024
        c.optimizer.learning_rate = 1e-6
        c.batch_size = 16
        c.num_train_steps = 10_000
        c.sample.guidance_scale = 5.0
    return c
