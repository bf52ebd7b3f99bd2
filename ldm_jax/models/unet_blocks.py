"""The U-Net's down, up and mid blocks (diffusers' `unet_2d_blocks.py`: `CrossAttnDownBlock2D`,
`DownBlock2D`, `CrossAttnUpBlock2D`, `UpBlock2D`, `UNetMidBlock2DCrossAttn`), with block
rematerialization and the checks of the conditioning hooks' additional residuals.
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
    Transformer2DModel,
    Upsample2D,
)

Dtype = Any
DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


def per_level(value, n: int) -> tuple:
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


class Block(nn.Module):
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
        ip_scales: jax.Array | None = None,  # f32[num_layers, num_ip_adapters]: per attention
        ip_masks: Sequence[jax.Array | None] = (),
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
                )(
                    h, context, train, ip_hidden_states,
                    None if ip_scales is None else ip_scales[j], ip_masks,
                )  # fmt: skip
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
    """`Transformer2DModel` fields of a down / up / mid block (`Block`, the mid block) at `width`
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


def intrablock_feature(adapter: list, cross: bool, shape: tuple, dtype) -> jax.Array | None:
    """The next T2I-Adapter feature for a cross-attention down block (popped and checked against
    the shape of its last transformer's output), else None."""
    if not (adapter and cross):
        return None
    (feature,) = add_residuals([jnp.zeros(shape, dtype)], [adapter.pop(0)], dtype, "down block")
    return feature


def add_residuals(features, residuals, dtype, what: str = "skip connection") -> list:
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
    def __call__(
        self, h, temb, context, train=False, ip_hidden_states=(), ip_scales=None, ip_masks=()
    ):
        c = h.shape[-1]
        res = lambda i: _remat(ResnetBlock2D, self.remat_policy)(
            c, self.norm_groups, self.norm_eps, self.dropout, dtype=self.dtype, name=f"resnets_{i}"
        )
        h = res(0)(h, temb, train)
        h = _remat(Transformer2DModel, self.remat_policy)(
            **_transformer_fields(self, c), name="attentions_0"
        )(h, context, train, ip_hidden_states, ip_scales, ip_masks)
        return res(1)(h, temb, train)
