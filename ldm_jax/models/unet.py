"""The conditional U-Net of latent diffusion (Rombach et al. 2022), laid out like diffusers'
`UNet2DConditionModel` so converted Stable Diffusion weights load by a mechanical name mapping
(`down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight` ->
`down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_k/kernel`).

The config fields use diffusers' vocabulary (see `UNET_VARIANTS`), so a `unet/config.json` from a
real checkpoint maps to `UNet2DConditionModel(**fields)` field by field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models.layers import TimestepEmbedding, conv, get_timestep_embedding, group_norm
from ldm_jax.models.unet_blocks import (
    DOWN_BLOCK_TYPES,
    UP_BLOCK_TYPES,
    Block,
    UNetMidBlock2DCrossAttn,
    add_residuals,
    intrablock_feature,
    per_level,
)

Dtype = Any


class UNet2DConditionModel(nn.Module):
    """diffusers `UNet2DConditionModel` (the SD 1.x / 2.x / XL denoiser), NHWC.

    Head counts follow diffusers exactly, quirk included: for SD1/2 configs `attention_head_dim`
    is really the *number of heads* per level (diffusers issue #2011: `num_attention_heads =
    num_attention_heads or attention_head_dim`), and each level's head width is
    channels // heads (SD1.5: 8 heads of 40..160; SD2.1: 5/10/20/20 heads of 64). Setting
    `num_attention_heads` takes precedence (diffusers itself rejects it for this class; here it
    means what its name says and is equivalent to passing the same value as attention_head_dim).

    SDXL's added conditioning (`addition_embed_type="text_time"`): pooled text embeddings [B, 1280]
    and micro-conditioning `time_ids` [B, 6] (original size, crop top-left, target size) are
    embedded as in diffusers (sinusoids of each time id, concatenated with text_embeds,
    `add_embedding` MLP) and added to the timestep embedding. The SDXL refiner uses 5 time ids
    (original size, crop top-left, aesthetic score): `projection_class_embeddings_input_dim`
    = 1280 + 5 * 256 = 2560.

    Inpainting U-Nets (SD 1.5/2 inpainting, SDXL inpainting) are the same network with
    `in_channels=9`: noisy latents, the mask downsampled to latent size, and the masked image's
    latents, concatenated along channels in that order.
    """

    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    cross_attention_dim: int = 768
    transformer_layers_per_block: int | tuple[int, ...] = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    dropout: float = 0.0
    addition_embed_type: str | None = None  # None or "text_time" (SDXL)
    addition_time_embed_dim: int | None = None  # SDXL: 256
    projection_class_embeddings_input_dim: int | None = None  # SDXL: 2816 = 1280 + 6 * 256
    # LCM students (Luo et al. 2023, Sec. 4.2): the guidance scale w enters as an embedding
    # (`timestep_cond`, [B, time_cond_proj_dim]) added to the timestep features.
    time_cond_proj_dim: int | None = None
    # IP-Adapter (Ye et al. 2023): image-prompt token streams read by every cross-attention layer
    # through their own key / value projections (layers.Attention); 0 = the plain U-Net.
    num_ip_adapters: int = 0
    attention_implementation: str | None = None  # attention.ATTENTION_IMPLEMENTATIONS; None = auto
    remat_policy: str = "none"  # unet_blocks.REMAT_POLICIES: block recompute in backward
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        train: bool = False,
        added_cond_kwargs: dict[str, jax.Array] | None = None,
        *,
        timestep_cond: jax.Array | None = None,
        down_block_additional_residuals: Sequence[jax.Array] | None = None,
        mid_block_additional_residual: jax.Array | None = None,
        down_intrablock_additional_residuals: Sequence[jax.Array] | None = None,
        ip_hidden_states: Sequence[jax.Array] = (),
        ip_adapter_scale: float | Sequence[float] = 1.0,
        ip_adapter_masks: Sequence[jax.Array | None] | None = None,
    ) -> jax.Array:
        """Predict the model output (eps / v / x0, per the training objective).

        Args:
          sample: float32[B, H, W, in_channels] noisy latents; H, W divisible by 2**(levels-1).
          timesteps: float32[B] or scalar, training-timestep units (fractional allowed).
          encoder_hidden_states: float32[B, L, cross_attention_dim] text embeddings.
          train: enables dropout (needs a "dropout" rng when dropout > 0).
          added_cond_kwargs: SDXL only: {"text_embeds": [B, 1280], "time_ids": [B, 6]} (base)
            or [B, 5] (refiner: sizes, crop and aesthetic score).
          timestep_cond: [B, time_cond_proj_dim], required when that field is set (LCM's
            guidance embedding, `layers.guidance_scale_embedding`).
          down_block_additional_residuals: one array per skip connection (conv_in's output, every
            down resnet / transformer output and every downsampler output, in that order: what
            ControlNet returns), each added to its skip before the up path reads it.
          mid_block_additional_residual: added to the mid block's output (ControlNet's last).
          down_intrablock_additional_residuals: T2I-Adapter's features, taken in order, one per
            down block while any remain: a cross-attention block adds its own to the output of
            its last transformer (before the skip and the downsampler), a plain block to its
            output (which is also its last skip: diffusers adds in place); one left over whose
            shape is the mid block's output's is added there (T2I-Adapter-XL).
          ip_hidden_states: num_ip_adapters arrays [B, S_i, cross_attention_dim], the image-prompt
            tokens of each IP-Adapter (its image projection's output), with `ip_adapter_scale`
            weighting each stream's attention output: one value, one per adapter, or
            f32[num_ip_layers, num_ip_adapters], one per cross-attention module (diffusers'
            per-block scales, `ip_adapter_layer_scales`).
          ip_adapter_masks: None, or per adapter None or f32[I, H, W] (diffusers'
            `ip_adapter_masks` after `IPAdapterMaskProcessor`, batch dimension dropped): that
            adapter's tokens are I images' equal groups, each attended alone and weighted by its
            mask resampled to every layer's resolution (`layers.ip_mask_weights`).
          All three as diffusers' `UNet2DConditionModel.forward`; without them the network and
          its parameters are exactly the plain U-Net's.
        Returns:
          float32[B, H, W, out_channels].
        """
        n = len(self.block_out_channels)
        factor = 2 ** (n - 1)
        if sample.shape[1] % factor or sample.shape[2] % factor:
            # diffusers then upsamples to the skip's size; we keep the exact x2 path only.
            raise ValueError(f"latent H, W must be divisible by {factor}, got {sample.shape}")
        if len(ip_hidden_states) != self.num_ip_adapters:
            raise ValueError(
                f"{len(ip_hidden_states)} ip_hidden_states for a U-Net with "
                f"num_ip_adapters={self.num_ip_adapters}"
            )
        scales = jnp.asarray(ip_adapter_scale, jnp.float32)
        if scales.ndim < 2:
            scales = jnp.broadcast_to(scales, (self.num_ip_adapters,))
        rows = self.num_ip_layers
        scales = jnp.broadcast_to(scales, (rows, self.num_ip_adapters))  # checks a given shape
        masks = tuple(ip_adapter_masks or (None,) * self.num_ip_adapters)
        if len(masks) != self.num_ip_adapters:
            raise ValueError(f"{len(masks)} ip_adapter_masks for {self.num_ip_adapters} adapters")
        ip = (tuple(s.astype(self.dtype) for s in ip_hidden_states), scales, masks)
        emb = self._time_embedding(sample.shape[0], timesteps, added_cond_kwargs, timestep_cond)
        context = encoder_hidden_states.astype(self.dtype)

        # Down path; `skips` are diffusers' down_block_res_samples.
        adapter = list(down_intrablock_additional_residuals or ())
        h, skips = self._down(sample.astype(self.dtype), emb, context, train, ip, adapter)
        if down_block_additional_residuals is not None:
            skips = add_residuals(skips, down_block_additional_residuals, self.dtype)

        # Middle.
        heads, _, transformer_layers = self._levels()
        h = UNetMidBlock2DCrossAttn(
            heads[-1], transformer_layers[-1], name="mid_block", **self._common()
        )(h, emb, context, train, ip[0], ip[1][-1], ip[2])  # its scales: the last row
        if adapter and adapter[0].shape == h.shape:  # T2I-Adapter-XL's last feature
            h = h + adapter.pop(0).astype(self.dtype)
        if adapter:
            shapes = [tuple(a.shape) for a in adapter]
            raise ValueError(
                f"{len(adapter)} down_intrablock_additional_residuals unused: {shapes}"
            )
        if mid_block_additional_residual is not None:
            (h,) = add_residuals([h], [mid_block_additional_residual], self.dtype, "mid block")

        # Up path, then out.
        h = self._up(h, skips, emb, context, train, ip)
        h = nn.silu(group_norm(self.norm_num_groups, self.norm_eps, self.dtype, "conv_norm_out")(h))
        h = conv(self.out_channels, 3, self.dtype, "conv_out")(h)
        return h.astype(jnp.float32)

    def ip_layer_rows(self) -> dict[str, list[slice]]:
        """Rows of a per-layer `ip_adapter_scale` ([num_ip_layers, num_ip_adapters]) that each
        down and up block reads, one per cross-attention module, in diffusers' order of
        `attn_processors`: down blocks, up blocks, then the mid block (the last row)."""
        _, layers, _ = self._levels()
        n, row, out = len(self.block_out_channels), 0, {"down": [], "up": []}
        blocks = [("down", i, b, layers[i]) for i, b in enumerate(self.down_block_types)]
        blocks += [("up", i, b, layers[n - 1 - i] + 1) for i, b in enumerate(self.up_block_types)]
        for where, _, block_type, count in blocks:
            count = count if block_type.startswith("CrossAttn") else 0
            out[where].append(slice(row, row + count))
            row += count
        return out

    @property
    def num_ip_layers(self) -> int:
        """Cross-attention modules (`attentions_j`) in the network, the mid block's included."""
        return self.ip_layer_rows()["up"][-1].stop + 1

    def _levels(self) -> tuple[list, list, list]:
        """(heads, resnets, transformer layers) per level."""
        n = len(self.block_out_channels)
        heads = per_level(self.num_attention_heads or self.attention_head_dim, n)
        return (
            heads,
            per_level(self.layers_per_block, n),
            per_level(self.transformer_layers_per_block, n),
        )

    def _common(self) -> dict:
        """The fields every block shares."""
        return {
            "norm_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "dropout": self.dropout,
            "use_linear_projection": self.use_linear_projection,
            "upcast_attention": self.upcast_attention,
            "attention_implementation": self.attention_implementation,
            "remat_policy": self.remat_policy,
            "dtype": self.dtype,
            "num_ip_adapters": self.num_ip_adapters,
        }

    def _time_embedding(self, batch: int, timesteps, added_cond_kwargs, timestep_cond):
        """Sinusoidal features of t (width block_out_channels[0]) -> MLP to 4x that width, plus
        LCM's guidance embedding and SDXL's added conditioning: [B, 4 * block_out_channels[0]]."""
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (batch,))
        t_emb = get_timestep_embedding(
            t, self.block_out_channels[0], self.flip_sin_to_cos, self.freq_shift
        )
        time_embed_dim = self.block_out_channels[0] * 4
        emb = TimestepEmbedding(
            time_embed_dim, self.dtype, cond_proj_dim=self.time_cond_proj_dim, name="time_embedding"
        )(t_emb.astype(self.dtype), timestep_cond)
        return emb + self._added_embedding(added_cond_kwargs, time_embed_dim)

    def _down(self, sample, emb, context, train, ip, adapter: list):
        """conv_in and the down blocks -> (h, skips); T2I-Adapter features are popped from
        `adapter` as the blocks use them."""
        n = len(self.block_out_channels)
        heads, layers, tlayers = self._levels()
        rows = self.ip_layer_rows()
        h = conv(self.block_out_channels[0], 3, self.dtype, "conv_in")(sample)
        skips = [h]
        for i, block_type in enumerate(self.down_block_types):
            if block_type not in DOWN_BLOCK_TYPES:
                raise ValueError(f"unknown down block type {block_type}")
            cross = block_type.startswith("CrossAttn")
            width = self.block_out_channels[i]
            h, res = Block(
                width,
                layers[i],
                up=False,
                cross_attention=cross,
                resample=i < n - 1,
                heads=heads[i],
                transformer_layers=tlayers[i],
                name=f"down_blocks_{i}",
                **self._common(),
            )(
                h, emb, context, (), train, ip[0], ip[1][rows["down"][i]], ip[2],
                intrablock=intrablock_feature(adapter, cross, (*h.shape[:3], width), self.dtype),
            )  # fmt: skip
            if adapter and not cross:  # added to the block's output, its last skip too
                h = add_residuals([h], [adapter.pop(0)], self.dtype, "down block output")[0]
                res = (*res[:-1], h)
            skips.extend(res)
        return h, skips

    def _up(self, h, skips, emb, context, train, ip):
        """The up blocks: level i mirrors down level n-1-i and consumes layers+1 skips."""
        n = len(self.block_out_channels)
        heads, layers, tlayers = self._levels()
        rows = self.ip_layer_rows()
        for i, block_type in enumerate(self.up_block_types):
            if block_type not in UP_BLOCK_TYPES:
                raise ValueError(f"unknown up block type {block_type}")
            level = n - 1 - i
            num = layers[level] + 1
            res, skips = skips[-num:], skips[:-num]
            h = Block(
                self.block_out_channels[level],
                num,
                up=True,
                cross_attention=block_type.startswith("CrossAttn"),
                resample=i < n - 1,
                heads=heads[level],
                transformer_layers=tlayers[level],
                name=f"up_blocks_{i}",
                **self._common(),
            )(h, emb, context, res, train, ip[0], ip[1][rows["up"][i]], ip[2])
        return h

    def _added_embedding(self, added_cond_kwargs, time_embed_dim: int):
        """Extra terms added to the timestep embedding; 0 for SD1/2 (diffusers `get_aug_embed`)."""
        if self.addition_embed_type is None:
            return 0.0
        if self.addition_embed_type != "text_time":
            raise NotImplementedError(f"addition_embed_type={self.addition_embed_type}")
        if added_cond_kwargs is None:
            raise ValueError("addition_embed_type='text_time' needs text_embeds and time_ids")
        text_embeds = added_cond_kwargs["text_embeds"]
        time_ids = jnp.asarray(added_cond_kwargs["time_ids"], jnp.float32)
        time_embeds = get_timestep_embedding(
            time_ids.reshape(-1),
            self.addition_time_embed_dim,
            self.flip_sin_to_cos,
            self.freq_shift,
        ).reshape(time_ids.shape[0], -1)
        add = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
        if add.shape[-1] != self.projection_class_embeddings_input_dim:
            raise ValueError(
                f"text_embeds + time_ids embed to width {add.shape[-1]}, config "
                f"says {self.projection_class_embeddings_input_dim}"
            )
        return TimestepEmbedding(time_embed_dim, self.dtype, name="add_embedding")(
            add.astype(self.dtype)
        )


_SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_SD_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3

# Field dicts equal to the `unet/config.json` of the real checkpoints (fields not listed keep the
# class defaults, which are SD1.5's).
UNET_VARIANTS: dict[str, dict[str, Any]] = {
    # runwayml/stable-diffusion-v1-5: 859,520,964 parameters.
    "sd15": {
        "down_block_types": _SD_DOWN,
        "up_block_types": _SD_UP,
        "block_out_channels": (320, 640, 1280, 1280),
        "attention_head_dim": 8,
        "cross_attention_dim": 768,
    },
    # stabilityai/stable-diffusion-2-1 (768-v): 865,910,724 parameters. upcast_attention=True
    # because the v-model overflows fp16 attention logits; the 512 "base" config sets False.
    "sd21": {
        "down_block_types": _SD_DOWN,
        "up_block_types": _SD_UP,
        "block_out_channels": (320, 640, 1280, 1280),
        "attention_head_dim": (5, 10, 20, 20),
        "cross_attention_dim": 1024,
        "use_linear_projection": True,
        "upcast_attention": True,
    },
    # stabilityai/stable-diffusion-xl-base-1.0: 2,567,463,684 parameters.
    "sdxl": {
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (320, 640, 1280),
        "attention_head_dim": (5, 10, 20),
        "transformer_layers_per_block": (1, 2, 10),
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
    # stabilityai/stable-diffusion-xl-refiner-1.0: 2,259,526,660 parameters (diffusers count).
    # Its config stores upcast_attention null, which diffusers reads as False.
    "sdxl-refiner": {
        "down_block_types": (
            "DownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (384, 768, 1536, 1536),
        "attention_head_dim": (6, 12, 24, 24),
        "transformer_layers_per_block": 4,
        "cross_attention_dim": 1280,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2560,
    },
    # For tests and CPU smoke runs on 8x8x4 latents: 3,193,604 parameters.
    "tiny": {
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (64, 128),
        "layers_per_block": 1,
        "attention_head_dim": 4,
        "cross_attention_dim": 128,
        "norm_num_groups": 32,
        "use_linear_projection": True,
    },
}


# The inpainting checkpoints are their base architecture with 9 input channels
# (runwayml/stable-diffusion-inpainting: 859,535,364 parameters; SD2 inpainting 865,925,124;
# SDXL inpainting 2,567,478,084; diffusers counts).
UNET_VARIANTS["sd15-inpaint"] = {**UNET_VARIANTS["sd15"], "in_channels": 9}
UNET_VARIANTS["sd2-inpaint"] = {
    **UNET_VARIANTS["sd21"],
    "in_channels": 9,
    "upcast_attention": False,
}
UNET_VARIANTS["sdxl-inpaint"] = {**UNET_VARIANTS["sdxl"], "in_channels": 9}


def unet_from_variant(name: str, **overrides) -> UNet2DConditionModel:
    """`UNet2DConditionModel` for a row of `UNET_VARIANTS`, with field overrides (e.g. dtype)."""
    fields = {**UNET_VARIANTS[name], **overrides}
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        fields[key] = tuple(fields[key])
    for key in (
        "layers_per_block",
        "attention_head_dim",
        "num_attention_heads",
        "transformer_layers_per_block",
    ):
        if isinstance(fields.get(key), list):
            fields[key] = tuple(fields[key])
    return UNet2DConditionModel(**fields)


def expand_block_scales(config, attentions: Mapping[str, Sequence[int]], default: float, what: str):
    """diffusers' per-block scales (`_maybe_expand_lora_scales_for_one_adapter`) as one scale
    per attention module: {"down": [[scale of attentions_j] of block i], "mid": scale, "up": ...}.

    config: {"down": ..., "mid": ..., "up": ...}: "mid" a number (or a list of one); "down" /
    "up" a number (every block with attention) or {"block_i": a number, a list of one, or one
    per attention module of the block}; what is not named is `default`. `attentions`: the
    number of attention modules of each down and up block (0: none; its scale is the default,
    and naming it is ignored, as in diffusers). Errors name `what` and the bad entry.
    """
    unknown = sorted(set(config) - {"down", "mid", "up"})
    if unknown:
        raise ValueError(f"{what} keys {unknown}; valid: down, mid, up")
    mid = config.get("mid", default)
    if isinstance(mid, (list, tuple)):
        if len(mid) != 1:
            raise ValueError(f"{what}: expected 1 scale for mid, got {len(mid)}")
        mid = mid[0]
    out: dict[str, Any] = {"mid": float(mid)}
    for where in ("down", "up"):
        blocks, counts = config.get(where, default), attentions[where]
        if isinstance(blocks, dict):
            valid = {f"block_{i}" for i in range(len(counts))}
            if set(blocks) - valid:
                raise ValueError(
                    f"{what} {where} names {sorted(set(blocks) - valid)}; this U-Net's {where} "
                    f"blocks: {', '.join(sorted(valid))}"
                )
        out[where] = []
        for i, count in enumerate(counts):
            value = blocks.get(f"block_{i}", default) if isinstance(blocks, dict) else blocks
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            if len(values) == 1:
                values = values * count
            if count and len(values) != count:
                raise ValueError(
                    f"{what}: expected {count} scales for {where}.block_{i}, got {len(values)}"
                )
            out[where].append([float(v) for v in values[:count]])
    return out


def ip_adapter_layer_scales(unet: UNet2DConditionModel, scale) -> np.ndarray:
    """diffusers' `set_ip_adapter_scale(scale)` as the U-Net's per-layer `ip_adapter_scale`:
    f32[num_ip_layers, num_ip_adapters].

    scale: one config for every adapter, or a list with one per adapter; a config is a number
    (every layer) or a dict of per-block scales (the InstantStyle recipes, e.g. "style only"
    {"up": {"block_0": [0.0, 1.0, 0.0]}}), expanded by `expand_block_scales` with default 0 (as
    diffusers' `_maybe_expand_lora_scales` with `default_scale=0.0`).
    """
    configs = list(scale) if isinstance(scale, (list, tuple)) else [scale]
    adapters = unet.num_ip_adapters
    if len(configs) == 1:
        configs = configs * adapters
    if len(configs) != adapters:
        raise ValueError(f"{len(configs)} IP-Adapter scale configs for {adapters} adapters")
    rows = unet.ip_layer_rows()
    counts = {w: [r.stop - r.start for r in rows[w]] for w in ("down", "up")}
    out = np.zeros((unet.num_ip_layers, adapters), np.float32)
    for a, config in enumerate(configs):
        if not isinstance(config, dict):
            out[:, a] = float(config)
            continue
        scales = expand_block_scales(config, counts, 0.0, "IP-Adapter scale")
        out[-1, a] = scales["mid"]
        for where in ("down", "up"):
            for rows_i, values in zip(rows[where], scales[where], strict=True):
                out[rows_i, a] = values
    return out
