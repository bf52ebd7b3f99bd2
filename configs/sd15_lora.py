"""A LoRA of Stable Diffusion 1.5's U-Net (or of any SD 1.x / 2.x checkpoint, or of a model
trained here) on your images.

  ldm-jax train --config configs/sd15_lora.py --workdir runs/sd15_lora \
      --config.pretrained=models/stable-diffusion-v1-5 --config.data.path=/data/my_photos

configs/sd15_finetune.py (data, checkpoint, sampling) with the objective `lora`
(ldm_jax/train/objectives/lora.py): the U-Net frozen, a rank-4 adapter of its attention
projections trained, as diffusers' examples/text_to_image/train_text_to_image_lora.py does
(rank 4, lr 1e-4 constant, no EMA). At the end the adapter is written to
`runs/sd15_lora/pytorch_lora_weights.safetensors` (diffusers' format, alpha in the metadata).

`,smoke`: sd15_finetune's smoke sizes, for a tiny random checkpoint (tests/test_lora.py).
An untuned starting point: no result is claimed yet.
"""

import pathlib

from ldm_jax.config import load_config_file, param_groups

SD15 = pathlib.Path(__file__).with_name("sd15_finetune.py")


def get_config(arg=None):
    c = load_config_file(f"{SD15}:{arg or ''}")  # its argument check, defaults and smoke sizes
    c.unlock()
    c.stage = "lora"
    c.lora = dict(
        rank=4,
        alpha=4.0,  # the branch is scaled by alpha / rank (Hu et al. 2021, Sec. 4.1)
        # diffusers' module names; also "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
        # "conv1", "conv2", "conv_shortcut", "time_emb_proj" (layers whose path ends with them)
        targets=("to_q", "to_k", "to_v", "to_out.0"),
        init="gaussian",  # A ~ N(0, 1/r^2), B = 0: training starts at the base model
        # Text-encoder LoRA (diffusers' --train_text_encoder): e.g. ("q_proj", "k_proj",
        # "v_proj", "out_proj"); its group "text_encoder_lora" takes optimizer fields from
        # config.param_groups.text_encoder_lora. Empty: the text encoders stay as they are.
        text_encoder_targets=(),
        # The file written at the end: "diffusers" (PEFT keys, alpha in the metadata) or "kohya"
        # (lora_unet_* / lora_te1_* keys, an alpha per layer: A1111, ComfyUI).
        export_layout="diffusers",
    )
    c.param_groups = param_groups("lora", "text_encoder_lora")
    c.ema_decay = 0.0  # no EMA copy of the adapter (set > 0 to keep one)
    c.optimizer.learning_rate = 1e-4
    return c
