"""Building blocks shared by the U-Net and the VAE, structured like diffusers' modules.

Every submodule is named after its diffusers counterpart, so that a PyTorch parameter path
`down_blocks.0.resnets.1.conv1.weight` is the Flax path `down_blocks_0/resnets_1/conv1/kernel`
(with NCHW/OIHW -> NHWC/HWIO transposes done by the converter). Arrays are NHWC. Parameters are
float32 (`param_dtype`); `dtype` is the compute dtype; group-norm statistics and the attention
softmax are always computed in float32.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
PARAM_DTYPE = jnp.float32


def get_timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal timestep embedding, the formula of diffusers' `get_timestep_embedding`.

    Transformer positional encoding (Vaswani et al. 2017, sec. 3.5) as used by DDPM (Ho et al. 2020):
    frequencies exp(-log(max_period) * i / (half - freq_shift)), i = 0..half-1.

    Args:
      timesteps: float32[B], training-timestep units; fractional values allowed.
      dim: embedding width.
      flip_sin_to_cos: order [cos, sin] if True (SD's U-Net), else [sin, cos].
      freq_shift: diffusers' `downscale_freq_shift` (0 for SD's U-Net).
    Returns:
      float32[B, dim].
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :] * scale
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2 == 1:  # diffusers zero-pads odd widths
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def group_norm(num_groups: int, eps: float, dtype: Dtype, name: str) -> nn.GroupNorm:
    """torch.nn.GroupNorm equivalent; flax computes the statistics in at least float32."""
    return nn.GroupNorm(
        num_groups=num_groups, epsilon=eps, dtype=dtype, param_dtype=PARAM_DTYPE, name=name
    )


def conv(features: int, kernel: int, dtype: Dtype, name: str, stride: int = 1, padding=None):
    """PyTorch-style Conv2d (symmetric padding kernel // 2 unless given)."""
    pad = kernel // 2 if padding is None else padding
    if isinstance(pad, int):
        pad = ((pad, pad), (pad, pad))
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=pad,
        dtype=dtype,
        param_dtype=PARAM_DTYPE,
        name=name,
    )


def dense(features: int, dtype: Dtype, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=PARAM_DTYPE, name=name)


class TimestepEmbedding(nn.Module):
    """diffusers `TimestepEmbedding`: linear_1 -> SiLU -> linear_2. [B, in] -> [B, time_embed_dim]."""

    time_embed_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, emb: jax.Array) -> jax.Array:
        emb = dense(self.time_embed_dim, self.dtype, "linear_1")(emb)
        return dense(self.time_embed_dim, self.dtype, "linear_2")(nn.silu(emb))


class ResnetBlock2D(nn.Module):
    """diffusers `ResnetBlock2D` (time_embedding_norm="default", output_scale_factor=1).

    norm1 -> SiLU -> conv1 -> (+ time_emb_proj(SiLU(temb))[:, None, None]) -> norm2 -> SiLU
    -> dropout -> conv2, plus the input (through a 1x1 `conv_shortcut` when the width changes).
    x: [B, H, W, Cin], temb: [B, T] or None (the VAE has no time embedding) -> [B, H, W, out].
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-5  # U-Net default; the VAE uses 1e-6
    dropout: float = 0.0
    use_temb: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None, train: bool = False):
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        h = conv(self.out_channels, 3, self.dtype, "conv1")(h)
        if self.use_temb and temb is not None:
            t = dense(self.out_channels, self.dtype, "time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:  # diffusers' use_in_shortcut default
            x = conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return x + h


class Attention(nn.Module):
    """diffusers `Attention` (AttnProcessor semantics), self- or cross-attention.

    to_q/to_k/to_v project to heads * dim_head (bias only when `qkv_bias`, False in the U-Net's
    transformer blocks, True in the VAE), softmax(q k^T / sqrt(dim_head)) v, then to_out_0 (with
    bias). Uses `jax.nn.dot_product_attention` (softmax in float32) so `implementation="cudnn"`
    switches to the fused GPU kernel.

    With `norm_groups` set this is the VAE mid-block attention (diffusers' converted `AttnBlock`,
    `_from_deprecated_attn_block=True`): GroupNorm -> attention over H*W tokens -> + input.

    x: [B, T, query_dim] or, with norm_groups, [B, H, W, C]; context: [B, S, D] (cross-attention,
    None for self-attention); mask: bool broadcastable to [B, heads, T, S], True = attend.
    """

    heads: int
    dim_head: int
    qkv_bias: bool = False
    upcast_attention: bool = False  # SD2.1-v: q k^T in float32 (diffusers upcast_attention)
    norm_groups: int | None = None
    norm_eps: float = 1e-6
    implementation: str | None = None  # None/"xla" or "cudnn"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, mask=None):
        residual = x
        spatial = x.ndim == 4
        if self.norm_groups is not None:
            x = group_norm(self.norm_groups, self.norm_eps, self.dtype, "group_norm")(x)
        if spatial:
            b, hgt, wid, c = x.shape
            x = x.reshape(b, hgt * wid, c)
        query_dim = x.shape[-1]
        context = x if context is None else context
        inner = self.heads * self.dim_head
        q = dense(inner, self.dtype, "to_q", self.qkv_bias)(x)
        k = dense(inner, self.dtype, "to_k", self.qkv_bias)(context)
        v = dense(inner, self.dtype, "to_v", self.qkv_bias)(context)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.dim_head)
        q, k, v = split(q), split(k), split(v)
        out_dtype = q.dtype
        if self.upcast_attention:
            q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
        out = jax.nn.dot_product_attention(
            q, k, v, mask=mask, scale=self.dim_head**-0.5, implementation=self.implementation
        ).astype(out_dtype)
        out = out.reshape(out.shape[0], out.shape[1], inner)
        out = dense(query_dim, self.dtype, "to_out_0")(out)
        if spatial:
            out = out.reshape(b, hgt, wid, query_dim)
        if self.norm_groups is not None:  # residual_connection=True, rescale_output_factor=1
            out = out + residual
        return out


class GEGLU(nn.Module):
    """diffusers `GEGLU` (Shazeer 2020): proj to 2*dim_out, hidden * GELU(gate), exact erf GELU."""

    dim_out: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        hidden, gate = jnp.split(dense(2 * self.dim_out, self.dtype, "proj")(x), 2, axis=-1)
        return hidden * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers `FeedForward(activation_fn="geglu", mult=4)`: net_0 (GEGLU) -> dropout -> net_2."""

    dim: int
    mult: int = 4
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = GEGLU(self.dim * self.mult, self.dtype, name="net_0")(x)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return dense(self.dim, self.dtype, "net_2")(h)


class BasicTransformerBlock(nn.Module):
    """diffusers `BasicTransformerBlock` (pre-LN): x += attn1(norm1(x)); x += attn2(norm2(x),
    context); x += ff(norm3(x)). x: [B, T, dim], context: [B, S, cross_attention_dim]."""

    dim: int
    heads: int
    dim_head: int
    upcast_attention: bool = False
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, train: bool = False):
        ln = lambda name: nn.LayerNorm(
            epsilon=1e-5, dtype=self.dtype, param_dtype=PARAM_DTYPE, name=name
        )
        attn = lambda name: Attention(
            self.heads,
            self.dim_head,
            upcast_attention=self.upcast_attention,
            implementation=self.attention_implementation,
            dtype=self.dtype,
            name=name,
        )
        x = x + attn("attn1")(ln("norm1")(x))
        x = x + attn("attn2")(ln("norm2")(x), context)
        return x + FeedForward(self.dim, dtype=self.dtype, name="ff")(ln("norm3")(x), train)


class Transformer2DModel(nn.Module):
    """diffusers `Transformer2DModel` for continuous (image) inputs (Rombach et al. 2022, sec. 3.3).

    GroupNorm(eps 1e-6) -> proj_in (1x1 conv, or linear over tokens when
    `use_linear_projection`, SD2.x/SDXL) -> `num_layers` BasicTransformerBlocks -> proj_out -> +x.
    x: [B, H, W, C], context: [B, S, D] -> [B, H, W, C].
    """

    heads: int
    dim_head: int
    num_layers: int = 1
    norm_groups: int = 32
    use_linear_projection: bool = False
    upcast_attention: bool = False
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, train: bool = False):
        b, hgt, wid, c = x.shape
        inner = self.heads * self.dim_head
        residual = x
        h = group_norm(self.norm_groups, 1e-6, self.dtype, "norm")(x)
        # A 1x1 conv and a linear layer over tokens are the same map; the two names exist because
        # the checkpoints store proj_in as a [C, C, 1, 1] conv (SD1) or a [C, C] linear (SD2/XL).
        if self.use_linear_projection:
            h = dense(inner, self.dtype, "proj_in")(h.reshape(b, hgt * wid, c))
        else:
            h = conv(inner, 1, self.dtype, "proj_in")(h).reshape(b, hgt * wid, inner)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(
                inner,
                self.heads,
                self.dim_head,
                self.upcast_attention,
                self.attention_implementation,
                self.dtype,
                name=f"transformer_blocks_{i}",
            )(h, context, train)
        if self.use_linear_projection:
            h = dense(c, self.dtype, "proj_out")(h).reshape(b, hgt, wid, c)
        else:
            h = conv(c, 1, self.dtype, "proj_out")(h.reshape(b, hgt, wid, inner))
        return h + residual


class Downsample2D(nn.Module):
    """diffusers `Downsample2D(use_conv=True)`: 3x3 conv, stride 2. [B, H, W, C] -> [B, H/2, W/2, out].

    padding=1 pads symmetrically (U-Net); padding=0 is the VAE's asymmetric variant, which pads
    (0, 1) at the bottom/right before the conv (from the original taming/LDM code).
    """

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        pad = ((1, 1), (1, 1)) if self.padding == 1 else ((0, 1), (0, 1))
        return conv(self.out_channels, 3, self.dtype, "conv", stride=2, padding=pad)(x)


class Upsample2D(nn.Module):
    """diffusers `Upsample2D(use_conv=True)`: nearest x2 then 3x3 conv. [B,H,W,C] -> [B,2H,2W,out]."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # exact nearest-neighbour x2
        return conv(self.out_channels, 3, self.dtype, "conv")(x)


def count_params(params) -> int:
    """Number of scalars in a parameter pytree (works on `jax.eval_shape` outputs too)."""
    return sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params))
