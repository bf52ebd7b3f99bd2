"""Model factories from a training config (`configs/shapes.py` and the configs like it): the
modules of a run trained here. Pretrained checkpoints build theirs from their own component
configs (`ldm_jax.convert.configs`)."""

from __future__ import annotations

import jax.numpy as jnp

from ldm_jax.models.clip import CLIPTextTransformer
from ldm_jax.models.unet import UNet2DConditionModel
from ldm_jax.models.vae import AutoencoderKL


def compute_dtype(config):
    """config.compute_dtype ("float32", "bfloat16" on accelerators): the dtype of activations and
    matmul inputs; parameters stay float32, and norms, softmax and the loss compute in float32."""
    return jnp.dtype(config.get("compute_dtype", "float32"))


def build_text_encoder(config, tokenizer) -> CLIPTextTransformer:
    te = config.text_encoder
    return CLIPTextTransformer(
        vocab_size=tokenizer.vocab_size,
        hidden_size=te.hidden_size,
        intermediate_size=te.intermediate_size,
        num_hidden_layers=te.num_hidden_layers,
        num_attention_heads=te.num_attention_heads,
        max_position_embeddings=tokenizer.context_length,
        hidden_act=te.hidden_act,
        eos_token_id=tokenizer.eos_token_id,
        dtype=compute_dtype(config),
    )


def build_unet(config, latent_channels: int) -> UNet2DConditionModel:
    u = config.unet
    return UNet2DConditionModel(
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(u.block_out_channels),
        down_block_types=tuple(u.down_block_types),
        up_block_types=tuple(u.up_block_types),
        layers_per_block=u.layers_per_block,
        attention_head_dim=u.attention_head_dim,
        cross_attention_dim=config.text_encoder.hidden_size,
        norm_num_groups=u.norm_num_groups,
        remat_policy=config.get("remat_policy", "none"),
        dtype=compute_dtype(config),
    )


def build_autoencoder(config) -> AutoencoderKL:
    ae = config.autoencoder
    return AutoencoderKL(
        block_out_channels=tuple(ae.block_out_channels),
        layers_per_block=ae.layers_per_block,
        latent_channels=ae.latent_channels,
        norm_num_groups=ae.norm_num_groups,
        dtype=compute_dtype(config),
    )


def latent_size(config) -> int:
    """The side of a run's latents: image_size over the VAE's downsampling factor."""
    return config.data.image_size // 2 ** (len(config.autoencoder.block_out_channels) - 1)


def autoencoder_signature(config) -> dict:
    """The config fields that fix the autoencoder's parameter shapes."""
    return {"autoencoder": config.autoencoder.to_dict(), "image_size": config.data.image_size}
