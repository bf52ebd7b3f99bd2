"""The conditional U-Net of latent diffusion (Rombach et al. 2022), laid out like diffusers'
`UNet2DConditionModel` so converted Stable Diffusion weights load by a mechanical name mapping
(`down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight` ->
`down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_k/kernel`).

The config fields use diffusers' vocabulary (see `UNET_VARIANTS`), so a `unet/config.json` from a
real checkpoint maps to `UNet2DConditionModel(**fields)` field by field.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import (
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    conv,
    get_timestep_embedding,
    group_norm,
)

Dtype = Any
DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


def _per_level(value, n: int) -> tuple:
    """diffusers accepts an int (same for every level) or one value per level."""
    if isinstance(value, int) or value is None:
        return (value,) * n
    if len(value) != n:
        raise ValueError(f"expected {n} per-level values, got {value}")
    return tuple(value)


# Rematerialization of the U-Net's resnet and transformer blocks (`remat_policy`): what the
# backward pass may keep from the forward pass instead of recomputing it (Chen et al. 2016,
# "Training Deep Nets with Sublinear Memory Cost"; jax.checkpoint policies).
REMAT_POLICIES = {
    "none": None,  # no remat: every activation is stored
    "full": "nothing_saveable",  # store only block inputs, recompute the rest
    "dots": "dots_with_no_batch_dims_saveable",  # keep linear-layer outputs, recompute the rest
}


def _remat(module_cls, policy: str):
    """`module_cls` itself, or its `nn.remat` version whose `train` argument (the third after
    self) is static."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {policy!r}; valid: {', '.join(REMAT_POLICIES)}")
    if REMAT_POLICIES[policy] is None:
        return module_cls
    saveable = getattr(jax.checkpoint_policies, REMAT_POLICIES[policy])
    return nn.remat(module_cls, policy=saveable, static_argnums=(3,))


class _Block(nn.Module):
    """One U-Net level: diffusers' `CrossAttnDownBlock2D` / `DownBlock2D` (`up=False`) or
    `CrossAttnUpBlock2D` / `UpBlock2D` (`up=True`), one module parameterized by `cross_attention`.

    Down: (resnet -> [transformer]) x num_layers -> [downsampler]; returns (h, skips) where skips
    are every resnet/transformer output and the downsampler output, as diffusers' `res_samples`.
    Up: (concat(h, skip.pop()) -> resnet -> [transformer]) x num_layers -> [upsampler].
    """

    out_channels: int
    num_layers: int
    up: bool = False
    cross_attention: bool = True
    resample: bool = True  # add_downsample / add_upsample (False on the last level)
    heads: int = 8
    transformer_layers: int = 1
    norm_groups: int = 32
    norm_eps: float = 1e-5
    dropout: float = 0.0
    use_linear_projection: bool = False
    upcast_attention: bool = False
    attention_implementation: str | None = None
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    num_ip_adapters: int = 0

    @nn.compact
    def __call__(
        self,
        h,
        temb,
        context,
        skips: Sequence[jax.Array] = (),
        train: bool = False,
        ip_hidden_states: Sequence[jax.Array] = (),
        ip_scales: jax.Array | None = None,
        intrablock: jax.Array | None = None,
    ):
        resnet = _remat(ResnetBlock2D, self.remat_policy)
        transformer = _remat(Transformer2DModel, self.remat_policy)
        skips = list(skips)
        outputs = []
        for j in range(self.num_layers):
            if self.up:
                h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = resnet(
                self.out_channels,
                self.norm_groups,
                self.norm_eps,
                self.dropout,
                dtype=self.dtype,
                name=f"resnets_{j}",
            )(h, temb, train)
            if self.cross_attention:
                h = transformer(
                    **_transformer_fields(self, self.out_channels), name=f"attentions_{j}"
                )(h, context, train, ip_hidden_states, ip_scales)
            if intrablock is not None and j == self.num_layers - 1:  # T2I-Adapter (down only)
                h = h + intrablock
            outputs.append(h)
        if self.resample and self.up:
            h = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(h)
        elif self.resample:
            h = Downsample2D(self.out_channels, 1, self.dtype, name="downsamplers_0")(h)
            outputs.append(h)
        return h if self.up else (h, tuple(outputs))


def _transformer_fields(block, width: int) -> dict:
    """`Transformer2DModel` fields of a down / up / mid block (`_Block`, the mid block) at `width`
    channels."""
    return dict(
        heads=block.heads,
        dim_head=width // block.heads,
        num_layers=block.transformer_layers,
        norm_groups=block.norm_groups,
        use_linear_projection=block.use_linear_projection,
        upcast_attention=block.upcast_attention,
        attention_implementation=block.attention_implementation,
        dtype=block.dtype,
        num_ip_adapters=block.num_ip_adapters,
    )


def _intrablock(adapter: list, cross: bool, shape: tuple, dtype) -> jax.Array | None:
    """The next T2I-Adapter feature for a cross-attention down block (popped and checked against
    the shape of its last transformer's output), else None."""
    if not (adapter and cross):
        return None
    (feature,) = _add_residuals([jnp.zeros(shape, dtype)], [adapter.pop(0)], dtype, "down block")
    return feature


def _add_residuals(features, residuals, dtype, what: str = "skip connection") -> list:
    """features[i] + residuals[i], the counts and shapes checked (ControlNet's outputs)."""
    residuals = list(residuals)
    if len(residuals) != len(features):
        raise ValueError(
            f"{len(residuals)} additional residuals for {len(features)} {what}s of this U-Net"
        )
    for i, (f, r) in enumerate(zip(features, residuals)):
        if r.shape != f.shape:
            raise ValueError(f"additional residual {i} has shape {r.shape}, its {what} {f.shape}")
    return [f + r.astype(dtype) for f, r in zip(features, residuals)]


class UNetMidBlock2DCrossAttn(nn.Module):
    """diffusers `UNetMidBlock2DCrossAttn`: resnets_0 -> attentions_0 -> resnets_1 (num_layers=1)."""

    heads: int
    transformer_layers: int = 1
    norm_groups: int = 32
    norm_eps: float = 1e-5
    dropout: float = 0.0
    use_linear_projection: bool = False
    upcast_attention: bool = False
    attention_implementation: str | None = None
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    num_ip_adapters: int = 0

    @nn.compact
    def __call__(self, h, temb, context, train: bool = False, ip_hidden_states=(), ip_scales=None):
        c = h.shape[-1]
        res = lambda i: _remat(ResnetBlock2D, self.remat_policy)(
            c, self.norm_groups, self.norm_eps, self.dropout, dtype=self.dtype, name=f"resnets_{i}"
        )
        h = res(0)(h, temb, train)
        h = _remat(Transformer2DModel, self.remat_policy)(
            **_transformer_fields(self, c), name="attentions_0"
        )(h, context, train, ip_hidden_states, ip_scales)
        return res(1)(h, temb, train)


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
    attention_implementation: str | None = None  # layers.ATTENTION_IMPLEMENTATIONS; None = auto
    remat_policy: str = "none"  # REMAT_POLICIES: recompute block activations in the backward pass
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
            (one value, or one per adapter) weighting each stream's attention output.
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
        heads = _per_level(self.num_attention_heads or self.attention_head_dim, n)
        layers = _per_level(self.layers_per_block, n)
        tlayers = _per_level(self.transformer_layers_per_block, n)
        common = {
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
        if len(ip_hidden_states) != self.num_ip_adapters:
            raise ValueError(
                f"{len(ip_hidden_states)} ip_hidden_states for a U-Net with "
                f"num_ip_adapters={self.num_ip_adapters}"
            )
        ip_scales = jnp.broadcast_to(
            jnp.asarray(ip_adapter_scale, jnp.float32), (self.num_ip_adapters,)
        )
        ip = (tuple(s.astype(self.dtype) for s in ip_hidden_states), ip_scales)

        # 1. time: sinusoidal features (width block_out_channels[0]) -> MLP to 4x that width.
        batch = sample.shape[0]
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (batch,))
        t_emb = get_timestep_embedding(
            t, self.block_out_channels[0], self.flip_sin_to_cos, self.freq_shift
        )
        time_embed_dim = self.block_out_channels[0] * 4
        emb = TimestepEmbedding(
            time_embed_dim, self.dtype, cond_proj_dim=self.time_cond_proj_dim, name="time_embedding"
        )(t_emb.astype(self.dtype), timestep_cond)
        emb = emb + self._added_embedding(added_cond_kwargs, time_embed_dim)
        context = encoder_hidden_states.astype(self.dtype)

        # 2. down path; `skips` are diffusers' down_block_res_samples.
        h = conv(self.block_out_channels[0], 3, self.dtype, "conv_in")(sample.astype(self.dtype))
        skips = [h]
        adapter = list(down_intrablock_additional_residuals or ())
        for i, block_type in enumerate(self.down_block_types):
            if block_type not in DOWN_BLOCK_TYPES:
                raise ValueError(f"unknown down block type {block_type}")
            cross = block_type.startswith("CrossAttn")
            h, res = _Block(
                self.block_out_channels[i],
                layers[i],
                up=False,
                cross_attention=cross,
                resample=i < n - 1,
                heads=heads[i],
                transformer_layers=tlayers[i],
                name=f"down_blocks_{i}",
                **common,
            )(
                h,
                emb,
                context,
                (),
                train,
                *ip,
                intrablock=_intrablock(
                    adapter, cross, (*h.shape[:3], self.block_out_channels[i]), self.dtype
                ),
            )
            if adapter and not cross:  # added to the block's output, its last skip too
                h = _add_residuals([h], [adapter.pop(0)], self.dtype, "down block output")[0]
                res = (*res[:-1], h)
            skips.extend(res)
        if down_block_additional_residuals is not None:
            skips = _add_residuals(skips, down_block_additional_residuals, self.dtype)

        # 3. middle
        h = UNetMidBlock2DCrossAttn(heads[-1], tlayers[-1], name="mid_block", **common)(
            h, emb, context, train, *ip
        )
        if adapter and adapter[0].shape == h.shape:  # T2I-Adapter-XL's last feature
            h = h + adapter.pop(0).astype(self.dtype)
        if adapter:
            shapes = [tuple(a.shape) for a in adapter]
            raise ValueError(
                f"{len(adapter)} down_intrablock_additional_residuals unused: {shapes}"
            )
        if mid_block_additional_residual is not None:
            (h,) = _add_residuals([h], [mid_block_additional_residual], self.dtype, "mid block")

        # 4. up path: level i mirrors down level n-1-i and consumes layers+1 skips.
        for i, block_type in enumerate(self.up_block_types):
            if block_type not in UP_BLOCK_TYPES:
                raise ValueError(f"unknown up block type {block_type}")
            level = n - 1 - i
            num = layers[level] + 1
            res, skips = skips[-num:], skips[:-num]
            h = _Block(
                self.block_out_channels[level],
                num,
                up=True,
                cross_attention=block_type.startswith("CrossAttn"),
                resample=i < n - 1,
                heads=heads[level],
                transformer_layers=tlayers[level],
                name=f"up_blocks_{i}",
                **common,
            )(h, emb, context, res, train, *ip)

        # 5. out
        h = nn.silu(group_norm(self.norm_num_groups, self.norm_eps, self.dtype, "conv_norm_out")(h))
        h = conv(self.out_channels, 3, self.dtype, "conv_out")(h)
        return h.astype(jnp.float32)

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
