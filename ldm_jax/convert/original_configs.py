"""diffusers / transformers configs for the components of an original single-file checkpoint.

Everything a weight shape shows is read from the shapes (so tiny test checkpoints work); what no
shape shows takes the released models' values:

- U-Net attention heads: SD 1.x uses 8 heads at every level (`attention_head_dim: 8`, diffusers'
  misnomer for the head count); SD 2.x and SDXL use 64-wide heads (`num_head_channels: 64` in
  the original configs), i.e. `channels // 64` heads per level (at least 1 for tiny models).
- CLIP heads: 64-wide (ViT-L 12, ViT-H 16, ViT-bigG 20), `hidden_size // 64`, at least 1.
- GroupNorm groups 32, LayerNorm eps 1e-5, activations (quick-GELU for OpenAI CLIP-L, GELU for
  OpenCLIP), VAE scaling factor (0.18215 SD, 0.13025 SDXL), sample sizes and schedulers.
- Prediction type: keys cannot tell epsilon from v. SD 2.x (non-inpaint) defaults to
  "v_prediction" (the 768-v release, which diffusers' single-file loader also assumes); all other
  kinds to "epsilon", unless the file has a `v_pred` marker entry or the caller says otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# (sample_size of the U-Net in latent pixels, VAE scaling_factor, upcast_attention)
_KIND_DEFAULTS = {
    "sd1": (64, 0.18215, False),
    "sd1-inpaint": (64, 0.18215, False),
    "sd2": (96, 0.18215, True),  # stabilityai/stable-diffusion-2-1: 768 px, upcast attention
    "sd2-inpaint": (64, 0.18215, False),
    "sdxl": (128, 0.13025, False),
    "sdxl-inpaint": (128, 0.13025, False),
    "sdxl-refiner": (128, 0.13025, False),
    "sdxl-refiner-inpaint": (128, 0.13025, False),
}


def _count(keys, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := regex.match(k))})


def _depth(keys, prefix: str) -> int:
    """Number of BasicTransformerBlocks in the Transformer2DModel at `prefix`."""
    return _count(keys, re.escape(prefix) + r"\.transformer_blocks\.(\d+)\.")


def unet_config(kind: str, sd: Mapping, pooled_dim: int | None = None) -> dict:
    """UNet2DConditionModel config from the shapes of a diffusers-named U-Net state dict.

    Args:
      sd: Mapping with `shape(key)`.
      pooled_dim: width of the pooled text embedding SDXL adds (text_encoder_2's projection), to
        split `projection_class_embeddings_input_dim` into it plus 6 (base) or 5 (refiner)
        size/crop/aesthetic Fourier features of `addition_time_embed_dim` each.
    """
    keys = list(sd)
    levels = _count(keys, r"down_blocks\.(\d+)\.")
    down_attn = [
        any(k.startswith(f"down_blocks.{b}.attentions.") for k in keys) for b in range(levels)
    ]
    up_attn = [any(k.startswith(f"up_blocks.{b}.attentions.") for k in keys) for b in range(levels)]
    channels = [sd.shape(f"down_blocks.{b}.resnets.0.conv2.weight")[0] for b in range(levels)]
    depth = [_depth(keys, f"down_blocks.{b}.attentions.0") for b in range(levels)]
    up_depth = [_depth(keys, f"up_blocks.{b}.attentions.0") for b in range(levels) if up_attn[b]]
    mid_depth = _depth(keys, "mid_block.attentions.0")
    attending = [d for d, a in zip(depth, down_attn) if a]
    # diffusers builds the mid block with transformer_layers_per_block[-1] and the up blocks with
    # the reversed list; levels without attention take any value (1, or the mid depth if last).
    if len(set(attending + [mid_depth])) == 1:
        transformer_depth = mid_depth  # SD 1/2: 1; SDXL refiner: 4
    else:
        transformer_depth = [d if a else 1 for d, a in zip(depth, down_attn)]
        if not down_attn[-1]:
            transformer_depth[-1] = mid_depth
    if up_depth != attending[::-1] or mid_depth != (
        transformer_depth if isinstance(transformer_depth, int) else transformer_depth[-1]
    ):
        raise ValueError(
            f"U-Net transformer depths down {depth}, mid {mid_depth}, up {up_depth} do not "
            "follow diffusers' transformer_layers_per_block convention"
        )
    first_attn = next(k for k in keys if k.endswith("attn2.to_k.weight"))
    proj_in = next(k for k in keys if k.endswith(".proj_in.weight"))
    sample_size, _, upcast = _KIND_DEFAULTS[kind]
    base = kind.removesuffix("-inpaint")
    if base == "sd1":
        heads = 8
    else:
        heads = [max(1, c // 64) for c in channels]
    config = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": sample_size,
        "in_channels": sd.shape("conv_in.weight")[1],
        "out_channels": sd.shape("conv_out.weight")[0],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": channels,
        "layers_per_block": _count(keys, r"down_blocks\.0\.resnets\.(\d+)\."),
        "transformer_layers_per_block": transformer_depth,
        "cross_attention_dim": sd.shape(first_attn)[1],
        "attention_head_dim": heads,
        "use_linear_projection": len(sd.shape(proj_in)) == 2,
        "upcast_attention": upcast,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "center_input_sample": False,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "addition_embed_type": None,
        "addition_time_embed_dim": None,
        "projection_class_embeddings_input_dim": None,
    }
    if sd.shape("time_embedding.linear_1.weight")[0] != 4 * channels[0]:
        raise ValueError("U-Net time embedding is not 4 x block_out_channels[0] wide")
    if "add_embedding.linear_1.weight" in sd:
        adm = sd.shape("add_embedding.linear_1.weight")[1]
        n_numbers = 5 if base == "sdxl-refiner" else 6  # refiner adds an aesthetic score
        time_dim = 256  # SDXL's value, when the pooled width is unknown
        if pooled_dim is not None and (adm - pooled_dim) % n_numbers == 0:
            time_dim = (adm - pooled_dim) // n_numbers
        config |= {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": time_dim,
            "addition_embed_type_num_heads": 64,
            "projection_class_embeddings_input_dim": adm,
        }
    return config


def vae_config(kind: str, sd: Mapping) -> dict:
    """AutoencoderKL config from the shapes of a diffusers-named VAE state dict."""
    keys = list(sd)
    levels = _count(keys, r"encoder\.down_blocks\.(\d+)\.")
    sample_size, scaling_factor, _ = _KIND_DEFAULTS[kind]
    return {
        "_class_name": "AutoencoderKL",
        "sample_size": sample_size * 8,
        "in_channels": sd.shape("encoder.conv_in.weight")[1],
        "out_channels": sd.shape("decoder.conv_out.weight")[0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [
            sd.shape(f"encoder.down_blocks.{b}.resnets.0.conv2.weight")[0] for b in range(levels)
        ],
        "layers_per_block": _count(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        "latent_channels": sd.shape("decoder.conv_in.weight")[1],
        "norm_num_groups": 32,
        "act_fn": "silu",
        "scaling_factor": scaling_factor,
        "force_upcast": True,
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
        "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in sd,
    }


def clip_config(sd: Mapping, hidden_act: str) -> dict:
    """transformers CLIPTextConfig dict from a `text_model.`-named CLIP state dict."""
    vocab, hidden = sd.shape("text_model.embeddings.token_embedding.weight")
    with_projection = "text_projection.weight" in sd
    return {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": sd.shape("text_model.encoder.layers.0.mlp.fc1.weight")[0],
        "num_hidden_layers": _count(sd, r"text_model\.encoder\.layers\.(\d+)\."),
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": sd.shape("text_model.embeddings.position_embedding.weight")[0],
        "hidden_act": hidden_act,
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        # The released SD configs: eos_token_id 2 selects transformers' argmax-of-ids pooling,
        # which is what OpenAI CLIP and OpenCLIP do.
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "projection_dim": sd.shape("text_projection.weight")[0] if with_projection else hidden,
    }


def scheduler_config(kind: str, prediction_type: str, zero_snr: bool = False) -> dict:
    """The scheduler each release ships (PNDM SD1, DDIM SD2, Euler SDXL), all on SD's
    scaled-linear betas 0.00085 -> 0.012 over 1000 steps, with the fields their
    scheduler_config.json files carry (all three say clip_sample false, which another class
    read from them, e.g. `--sampler ddim`, then keeps instead of its own default)."""
    base = kind.removesuffix("-inpaint")
    name = {"sd1": "PNDMScheduler", "sd2": "DDIMScheduler"}.get(base, "EulerDiscreteScheduler")
    config = {
        "_class_name": name,
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "prediction_type": prediction_type,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "clip_sample": False,
    }
    if name == "PNDMScheduler":
        config["skip_prk_steps"] = True
    elif name == "DDIMScheduler":
        config["rescale_betas_zero_snr"] = zero_snr
    else:
        config |= {"interpolation_type": "linear", "use_karras_sigmas": False}
        config["rescale_betas_zero_snr"] = zero_snr
    return config


def configs_for(
    kind: str,
    state_dicts: Mapping[str, Mapping],
    *,
    prediction_type: str | None = None,
    v_pred_marker: bool = False,
    zero_snr_marker: bool = False,
) -> dict:
    """All component configs plus "scheduler" for `kind` (see the module docstring)."""
    if prediction_type is None:
        v = v_pred_marker or kind == "sd2"
        prediction_type = "v_prediction" if v else "epsilon"
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}; expected one of {PREDICTION_TYPES}")
    configs = {}
    te2 = state_dicts.get("text_encoder_2")
    if te2 is not None:
        configs["text_encoder_2"] = clip_config(te2, "gelu")
    if "text_encoder" in state_dicts:
        act = "gelu" if kind.startswith("sd2") else "quick_gelu"
        configs["text_encoder"] = clip_config(state_dicts["text_encoder"], act)
    pooled = configs["text_encoder_2"]["projection_dim"] if te2 is not None else None
    configs["unet"] = unet_config(kind, state_dicts["unet"], pooled_dim=pooled)
    if "vae" in state_dicts:
        configs["vae"] = vae_config(kind, state_dicts["vae"])
    configs["scheduler"] = scheduler_config(kind, prediction_type, zero_snr_marker)
    return configs
