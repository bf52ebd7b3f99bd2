"""diffusers / transformers `config.json` <-> ldm_jax module fields.

Our modules use the diffusers / transformers field names, so most options copy over. Options of
architectures ldm_jax does not implement must hold their default value, else the error names the
option: a checkpoint is never loaded into a network that differs from the one it was trained for.
Missing options take the *diffusers* default (which differs from ours for `cross_attention_dim`),
as `UNet2DConditionModel.from_config` would.
"""

from __future__ import annotations

from typing import Any

from ldm_jax.models.clip import CLIPTextTransformer
from ldm_jax.models.unet import UNet2DConditionModel
from ldm_jax.models.vae import AutoencoderKL


class UnsupportedConfigError(ValueError):
    """A config option whose value selects an architecture ldm_jax does not implement."""


# diffusers 0.42 `UNet2DConditionModel.__init__` defaults of the options we map.
UNET_DEFAULTS: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "use_linear_projection": False,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "upcast_attention": False,
    "projection_class_embeddings_input_dim": None,
    "time_cond_proj_dim": None,
}
# Options that must keep these values (None in a config means the default too).
UNET_FIXED: dict[str, Any] = {
    "center_input_sample": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}
# Options that do not change the network (metadata, or fp16 advice irrelevant in float32).
UNET_IGNORED = {"sample_size", "addition_embed_type_num_heads"}

VAE_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
}
VAE_FIXED: dict[str, Any] = {
    "act_fn": "silu",
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "mid_block_add_attention": True,
}
VAE_IGNORED = {"sample_size", "force_upcast", "down_block_types", "up_block_types"}

CLIP_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "eos_token_id",
)
# transformers `CLIPTextConfig` defaults, for configs that omit an option.
CLIP_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "eos_token_id": 49407,
    "projection_dim": 512,
}


CLIP_VISION_FIELDS = (
    "image_size",
    "patch_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_act",
    "layer_norm_eps",
)
# transformers `CLIPVisionConfig` defaults (ViT-B/32), for configs that omit an option.
CLIP_VISION_DEFAULTS: dict[str, Any] = {
    "image_size": 224,
    "patch_size": 32,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "num_channels": 3,
    "projection_dim": 512,
}
CLIP_MODEL_PROJECTION_DIM = 512  # transformers `CLIPConfig.projection_dim` default


def _tuple(value):
    return tuple(value) if isinstance(value, list) else value


def _check_fixed(config: dict, fixed: dict, known: set, component: str) -> None:
    bad = []
    for key, value in config.items():
        if key.startswith("_") or key in known:
            continue
        if key not in fixed:
            bad.append(f"{key}={value!r} (unknown option)")
            continue
        want = fixed[key]
        # diffusers accepts per-level lists for some; every level must hold the default.
        values = value if isinstance(value, list) and not isinstance(want, list) else [value]
        if any(v is not None and v != want for v in values):
            bad.append(f"{key}={value!r} (ldm_jax implements only {want!r})")
    if bad:
        raise UnsupportedConfigError(f"{component} config: unsupported options: " + ", ".join(bad))


def unet_fields(config: dict) -> dict[str, Any]:
    """`UNet2DConditionModel` fields from a diffusers `unet/config.json` dict."""
    _check_fixed(config, UNET_FIXED, set(UNET_DEFAULTS) | UNET_IGNORED, "unet")
    fields = {k: _tuple(config.get(k, d)) for k, d in UNET_DEFAULTS.items()}
    fields["upcast_attention"] = bool(fields["upcast_attention"])  # SDXL refiner stores null
    fields["use_linear_projection"] = bool(fields["use_linear_projection"])
    cross = fields["cross_attention_dim"]
    if isinstance(cross, tuple):  # per-level cross_attention_dim: SD family uses one value
        if len(set(cross)) != 1:
            raise UnsupportedConfigError(f"unet config: per-level cross_attention_dim={cross}")
        fields["cross_attention_dim"] = cross[0]
    if fields["addition_embed_type"] not in (None, "text_time"):
        raise UnsupportedConfigError(
            f"unet config: addition_embed_type={fields['addition_embed_type']!r} "
            "(ldm_jax implements None and 'text_time')"
        )
    for key, allowed in (("down_block_types", ("CrossAttnDownBlock2D", "DownBlock2D")),
                         ("up_block_types", ("CrossAttnUpBlock2D", "UpBlock2D"))):  # fmt: skip
        bad = [t for t in fields[key] if t not in allowed]
        if bad:
            raise UnsupportedConfigError(f"unet config: {key} has {bad}; ldm_jax has {allowed}")
    return fields


def unet_from_config(config: dict, **overrides) -> UNet2DConditionModel:
    return UNet2DConditionModel(**{**unet_fields(config), **overrides})


def unet_to_config(model: UNet2DConditionModel, sample_size: int | None = None) -> dict:
    """A diffusers `unet/config.json` dict for `model` (`_class_name` included)."""
    config: dict[str, Any] = {"_class_name": "UNet2DConditionModel"}
    for key in UNET_DEFAULTS:
        value = getattr(model, key)
        config[key] = list(value) if isinstance(value, tuple) else value
    config.update(UNET_FIXED)
    if model.num_attention_heads is not None:
        # diffusers rejects num_attention_heads for this class; attention_head_dim holds heads.
        config["attention_head_dim"] = config.pop("num_attention_heads")
        config["num_attention_heads"] = None
        if isinstance(config["attention_head_dim"], tuple):
            config["attention_head_dim"] = list(config["attention_head_dim"])
    if sample_size is not None:
        config["sample_size"] = sample_size
    return config


def vae_fields(config: dict) -> dict[str, Any]:
    """`AutoencoderKL` fields from a diffusers `vae/config.json` dict."""
    _check_fixed(config, VAE_FIXED, set(VAE_DEFAULTS) | VAE_IGNORED, "vae")
    for key, allowed in (("down_block_types", "DownEncoderBlock2D"),
                         ("up_block_types", "UpDecoderBlock2D")):  # fmt: skip
        bad = [t for t in config.get(key, ()) if t != allowed]
        if bad:
            raise UnsupportedConfigError(f"vae config: {key} has {bad}; ldm_jax has {allowed}")
    fields = {k: _tuple(config.get(k, d)) for k, d in VAE_DEFAULTS.items()}
    n = len(fields["block_out_channels"])
    for key in ("down_block_types", "up_block_types"):
        if key in config and len(config[key]) != n:
            raise UnsupportedConfigError(
                f"vae config: {len(config[key])} {key} for {n} block_out_channels"
            )
    return fields


def vae_from_config(config: dict, **overrides) -> AutoencoderKL:
    return AutoencoderKL(**{**vae_fields(config), **overrides})


def vae_to_config(model: AutoencoderKL, sample_size: int | None = None) -> dict:
    n = len(model.block_out_channels)
    config: dict[str, Any] = {
        "_class_name": "AutoencoderKL",
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
    }
    for key in VAE_DEFAULTS:
        value = getattr(model, key)
        config[key] = list(value) if isinstance(value, tuple) else value
    config.update(VAE_FIXED)
    if sample_size is not None:
        config["sample_size"] = sample_size
    return config


def clip_fields(config: dict) -> dict[str, Any]:
    """`CLIPTextTransformer` fields from a transformers `CLIPTextConfig` dict.

    `CLIPTextModelWithProjection` (in `architectures`) sets `projection_dim`. transformers pools at
    the largest token id when `eos_token_id == 2` (configs written before its PR #24773, e.g.
    SD1.5's), which `legacy_argmax_pooling` reproduces.
    """
    if config.get("model_type", "clip_text_model") != "clip_text_model":
        if isinstance(config.get("text_config"), dict):  # a full CLIPModel config
            config = config["text_config"]
        else:
            raise UnsupportedConfigError(
                f"text encoder config: model_type={config.get('model_type')!r}, "
                "expected 'clip_text_model'"
            )
    architectures = config.get("architectures") or ["CLIPTextModel"]
    if architectures[0] not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        raise UnsupportedConfigError(f"text encoder config: architectures={architectures}")
    fields = {k: config.get(k, CLIP_DEFAULTS[k]) for k in CLIP_FIELDS}
    if fields["hidden_act"] not in ("quick_gelu", "gelu"):
        raise UnsupportedConfigError(
            f"text encoder config: hidden_act={fields['hidden_act']!r} "
            "(ldm_jax implements 'quick_gelu' and 'gelu')"
        )
    with_projection = architectures[0] == "CLIPTextModelWithProjection"
    fields["projection_dim"] = (
        config.get("projection_dim", CLIP_DEFAULTS["projection_dim"]) if with_projection else None
    )
    fields["legacy_argmax_pooling"] = fields["eos_token_id"] == 2
    return fields


def clip_from_config(config: dict, **overrides) -> CLIPTextTransformer:
    return CLIPTextTransformer(**{**clip_fields(config), **overrides})


def clip_vision_fields(config: dict) -> dict[str, Any]:
    """`CLIPVisionTransformer` fields from a transformers `CLIPVisionConfig` dict.

    `CLIPVisionModelWithProjection` (in `architectures`) sets `projection_dim`. Options this
    implementation lacks are errors: another activation, other than 3 input channels, and
    non-square (list-valued) `image_size` / `patch_size`, which transformers' CLIP accepts in
    its config but its embeddings cannot use either.
    """
    if config.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise UnsupportedConfigError(
            f"vision config: model_type={config.get('model_type')!r}, expected 'clip_vision_model'"
        )
    fields = {k: config.get(k, CLIP_VISION_DEFAULTS[k]) for k in CLIP_VISION_FIELDS}
    bad = []
    if fields["hidden_act"] not in ("quick_gelu", "gelu"):
        bad.append(f"hidden_act={fields['hidden_act']!r} (ldm_jax implements 'quick_gelu', 'gelu')")
    for key in ("image_size", "patch_size"):
        if not isinstance(fields[key], int) or isinstance(fields[key], bool):
            bad.append(f"{key}={fields[key]!r} (ldm_jax implements one int: square)")
    if config.get("num_channels", 3) != 3:
        bad.append(f"num_channels={config['num_channels']!r} (ldm_jax implements 3: RGB)")
    if fields["hidden_size"] % fields["num_attention_heads"]:
        bad.append(
            f"hidden_size={fields['hidden_size']} is not a multiple of "
            f"num_attention_heads={fields['num_attention_heads']}"
        )
    if bad:
        raise UnsupportedConfigError("vision config: unsupported options: " + ", ".join(bad))
    architectures = config.get("architectures") or ["CLIPVisionModel"]
    fields["projection_dim"] = (
        config.get("projection_dim", CLIP_VISION_DEFAULTS["projection_dim"])
        if architectures[0] == "CLIPVisionModelWithProjection"
        else None
    )
    return fields


def _clip_sub_config(config: dict, name: str, defaults: dict) -> dict:
    """`text_config` / `vision_config` of a `CLIPConfig` dict as transformers reads it
    (`CLIPConfig.__post_init__`): a legacy `<name>_dict` (openai/clip-vit-large-patch14 has
    both) overrides every field of `<name>`, with the sub-config's default where it omits one."""
    sub = dict(config.get(name) or {})
    legacy = config.get(f"{name}_dict")
    if legacy is not None:
        sub.update({**defaults, **legacy})
    return sub


def clip_model_fields(config: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`CLIPTextTransformer` fields, `CLIPVisionTransformer` fields) from a transformers
    `CLIPModel` config.json dict (`model_type` "clip"). Both towers get the model's
    `projection_dim` (the sub-configs' own `projection_dim` is unused by `CLIPModel`)."""
    if config.get("model_type") != "clip":
        raise UnsupportedConfigError(
            f"CLIP model config: model_type={config.get('model_type')!r}, expected 'clip' "
            "(a transformers CLIPModel config.json with text_config and vision_config)"
        )
    projection_dim = config.get("projection_dim", CLIP_MODEL_PROJECTION_DIM)
    text = _clip_sub_config(config, "text_config", CLIP_DEFAULTS)
    text_fields = clip_fields({**text, "architectures": ["CLIPTextModelWithProjection"]})
    vision = _clip_sub_config(config, "vision_config", CLIP_VISION_DEFAULTS)
    vision_fields = clip_vision_fields({**vision, "architectures": None})
    text_fields["projection_dim"] = vision_fields["projection_dim"] = projection_dim
    return text_fields, vision_fields


def clip_to_config(model: CLIPTextTransformer, base: dict | None = None) -> dict:
    """A transformers `CLIPTextConfig` dict for `model`; `base` supplies token ids etc."""
    config = {
        "model_type": "clip_text_model",
        "bos_token_id": 49406,
        "pad_token_id": 1,
        **(base or {}),
    }
    config["architectures"] = [
        "CLIPTextModelWithProjection" if model.projection_dim else "CLIPTextModel"
    ]
    for key in CLIP_FIELDS:
        config[key] = getattr(model, key)
    if model.projection_dim:
        config["projection_dim"] = model.projection_dim
    if model.legacy_argmax_pooling != (model.eos_token_id == 2):
        raise ValueError(
            "transformers decides argmax pooling by eos_token_id == 2; this model's "
            f"legacy_argmax_pooling={model.legacy_argmax_pooling} with "
            f"eos_token_id={model.eos_token_id} has no transformers config"
        )
    return config
