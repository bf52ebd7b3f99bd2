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
import numpy as np

from ldm_jax.models.attention import dot_product_attention
from ldm_jax.sharding import constrain

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


def guidance_scale_embedding(w: jax.Array, dim: int) -> jax.Array:
    """LCM's embedding of the guidance scale (Luo et al. 2023, Sec. 4.2; diffusers'
    `LatentConsistencyModelPipeline.get_guidance_scale_embedding`): sinusoids of 1000 w, [sin, cos]
    with frequencies exp(-log(10^4) i / (dim/2 - 1)), zero-padded to an odd `dim`. The U-Net's
    `timestep_cond` (diffusers' LCM pipeline passes w = guidance_scale - 1). w: [B] -> [B, dim]."""
    return get_timestep_embedding(jnp.asarray(w, jnp.float32) * 1000.0, dim, False, 1.0)


def dense(features: int, dtype: Dtype, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=PARAM_DTYPE, name=name)


class TimestepEmbedding(nn.Module):
    """diffusers `TimestepEmbedding`: linear_1 -> SiLU -> linear_2. [B, in] -> [B, time_embed_dim].

    cond_proj_dim: a second input (`condition` [B, cond_proj_dim], LCM's guidance-scale embedding)
    is projected by a bias-free `cond_proj` to the input's width and added before linear_1.
    """

    time_embed_dim: int
    dtype: Dtype = jnp.float32
    cond_proj_dim: int | None = None

    @nn.compact
    def __call__(self, emb: jax.Array, condition: jax.Array | None = None) -> jax.Array:
        if self.cond_proj_dim is not None:
            want = (emb.shape[0], self.cond_proj_dim)
            if condition is None or condition.shape != want:
                got = None if condition is None else condition.shape
                raise ValueError(
                    f"this embedding takes a condition of shape {want} (cond_proj_dim), got {got}"
                )
            cond = dense(emb.shape[-1], self.dtype, "cond_proj", use_bias=False)
            emb = emb + cond(condition.astype(self.dtype))
        elif condition is not None:
            raise ValueError("a condition was given to an embedding without cond_proj_dim")
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
        return constrain(x + h, ("batch", None, None, None))


class Attention(nn.Module):
    """diffusers `Attention` (AttnProcessor semantics), self- or cross-attention.

    to_q/to_k/to_v project to heads * dim_head (bias only when `qkv_bias`, False in the U-Net's
    transformer blocks, True in the VAE), softmax(q k^T / sqrt(dim_head)) v, then to_out_0 (with
    bias). `implementation` picks the kernel (`dot_product_attention`): "auto" (None) is cuDNN
    flash attention on GPU where it applies and the chunked kernel on CPU; "xla", "chunked" and
    "cudnn" force one. Every kernel computes the softmax in float32.

    With `norm_groups` set this is the VAE mid-block attention (diffusers' converted `AttnBlock`,
    `_from_deprecated_attn_block=True`): GroupNorm -> attention over H*W tokens -> + input.

    x: [B, T, query_dim] or, with norm_groups, [B, H, W, C]; context: [B, S, D] (cross-attention,
    None for self-attention); mask: bool broadcastable to [B, heads, T, S], True = attend.

    num_ip_adapters = n > 0: IP-Adapter's decoupled cross-attention (Ye et al. 2023, Sec. 3.2;
    diffusers' `IPAdapterAttnProcessor2_0`): n more token streams (`ip_hidden_states`, each
    [B, S_i, D]) are attended by the same queries through their own bias-free key and value
    projections (`processor/to_k_ip_i`, `processor/to_v_ip_i`, diffusers' names), and each
    result, times its scale (`ip_scales`, [n], default 1), is added to the text attention's before
    `to_out_0`. `ip_masks` (diffusers' `ip_adapter_masks`): per stream None, or f32[I, H, W], one
    mask per image of the stream's I images (its tokens then split into I equal groups): each
    image's tokens are attended on their own and their result weighted, per query, by its mask
    resampled to the queries' grid (`ip_mask_weights`), so image i steers only where mask i is.
    """

    heads: int
    dim_head: int
    qkv_bias: bool = False
    upcast_attention: bool = False  # SD2.1-v: q k^T in float32 (diffusers upcast_attention)
    norm_groups: int | None = None
    norm_eps: float = 1e-6
    implementation: str | None = None  # attention.ATTENTION_IMPLEMENTATIONS; None = "auto"
    dtype: Dtype = jnp.float32
    num_ip_adapters: int = 0

    @nn.compact
    def __call__(
        self, x, context=None, mask=None, ip_hidden_states=(), ip_scales=None, ip_masks=()
    ):
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
        split = lambda t: constrain(
            t.reshape(t.shape[0], t.shape[1], self.heads, self.dim_head),
            ("batch", None, "heads", None),
        )
        q, k, v = split(q), split(k), split(v)
        out_dtype = q.dtype
        if self.upcast_attention:
            q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
        attend = lambda k, v, mask: dot_product_attention(
            q, k, v, mask, scale=self.dim_head**-0.5, implementation=self.implementation
        ).astype(out_dtype)
        out = attend(k, v, mask)
        if len(ip_hidden_states) != self.num_ip_adapters:
            raise ValueError(
                f"{len(ip_hidden_states)} ip_hidden_states for an attention layer with "
                f"num_ip_adapters={self.num_ip_adapters}"
            )
        if self.num_ip_adapters:
            if ip_scales is None:
                ip_scales = jnp.ones((self.num_ip_adapters,), jnp.float32)
            streams = _IPAdapterProjections(inner, self.dtype, name="processor")
            masks = tuple(ip_masks) or (None,) * self.num_ip_adapters
            for i, (k_i, v_i) in enumerate(streams(ip_hidden_states)):
                k_i, v_i = split(k_i), split(v_i)
                if self.upcast_attention:
                    k_i, v_i = k_i.astype(jnp.float32), v_i.astype(jnp.float32)
                if masks[i] is None:
                    ip_out = attend(k_i, v_i, None)
                else:  # each image's tokens on their own, weighted by its mask
                    weights = ip_mask_weights(masks[i], x.shape[1]).astype(out_dtype)  # [I, T]
                    images = weights.shape[0]
                    k_i, v_i = (t.reshape(t.shape[0], images, -1, *t.shape[2:]) for t in (k_i, v_i))
                    ip_out = sum(
                        attend(k_i[:, j], v_i[:, j], None) * weights[j][None, :, None, None]
                        for j in range(images)
                    )
                out = out + jnp.asarray(ip_scales[i], out_dtype) * ip_out
        out = out.reshape(out.shape[0], out.shape[1], inner)
        out = dense(query_dim, self.dtype, "to_out_0")(out)
        if spatial:
            out = out.reshape(b, hgt, wid, query_dim)
        if self.norm_groups is not None:  # residual_connection=True, rescale_output_factor=1
            out = out + residual
        return out


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """f64[n_out, n_in]: torch's `interpolate(mode="bicubic", align_corners=False)` along one
    axis: Keys' cubic convolution with A = -0.75 around the source coordinate
    (o + 1/2) n_in / n_out - 1/2, its four taps clamped to the border, no antialiasing."""
    a = -0.75
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
    out = np.zeros((n_out, n_in))
    for o in range(n_out):
        real = (o + 0.5) * n_in / n_out - 0.5
        index = int(np.floor(real))
        t = real - index
        weights = (far(t + 1), near(t), near(1 - t), far(2 - t))
        for tap, w in zip(range(index - 1, index + 3), weights):
            out[o, min(max(tap, 0), n_in - 1)] += w
    return out


def ip_mask_weights(mask: jax.Array, num_queries: int) -> jax.Array:
    """f32[I, num_queries]: IP-Adapter masks f32[I, H, W] (or [1, I, H, W]) at the resolution of
    an attention layer's queries, as diffusers' `IPAdapterMaskProcessor.downsample`: a grid of
    mask_h = ceil-ish(sqrt(Q / (W / H))) rows and Q // mask_h columns, bicubic, flattened and
    zero-padded or cut to Q."""
    mask = jnp.asarray(mask, jnp.float32)
    mask = mask.reshape(-1, *mask.shape[-2:])
    images, height, width = mask.shape
    rows = int(math.sqrt(num_queries / (width / height)))
    rows += int(num_queries % rows != 0)
    cols = num_queries // rows
    grid = jnp.einsum(
        "ph,ihw,qw->ipq",
        _bicubic_matrix(height, rows).astype(np.float32),
        mask,
        _bicubic_matrix(width, cols).astype(np.float32),
    ).reshape(images, rows * cols)
    if rows * cols < num_queries:
        return jnp.pad(grid, ((0, 0), (0, num_queries - rows * cols)))
    return grid[:, :num_queries]


class _IPAdapterProjections(nn.Module):
    """The key and value projections of IP-Adapter's streams in one cross-attention layer."""

    inner: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, streams):
        return [
            (
                dense(self.inner, self.dtype, f"to_k_ip_{i}", False)(s.astype(self.dtype)),
                dense(self.inner, self.dtype, f"to_v_ip_{i}", False)(s.astype(self.dtype)),
            )
            for i, s in enumerate(streams)
        ]


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
        h = constrain(
            GEGLU(self.dim * self.mult, self.dtype, name="net_0")(x), ("batch", None, "mlp")
        )
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
    num_ip_adapters: int = 0  # extra streams of the cross-attention (Attention)

    @nn.compact
    def __call__(
        self, x, context, train: bool = False, ip_hidden_states=(), ip_scales=None, ip_masks=()
    ):
        ln = lambda name: nn.LayerNorm(
            epsilon=1e-5, dtype=self.dtype, param_dtype=PARAM_DTYPE, name=name
        )
        attn = lambda name, streams=0: Attention(
            self.heads,
            self.dim_head,
            upcast_attention=self.upcast_attention,
            implementation=self.attention_implementation,
            dtype=self.dtype,
            num_ip_adapters=streams,
            name=name,
        )
        x = x + attn("attn1")(ln("norm1")(x))
        x = x + attn("attn2", self.num_ip_adapters)(
            ln("norm2")(x), context, None, ip_hidden_states, ip_scales, ip_masks
        )
        x = x + FeedForward(self.dim, dtype=self.dtype, name="ff")(ln("norm3")(x), train)
        return constrain(x, ("batch", None, None))


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
    num_ip_adapters: int = 0  # extra streams of the cross-attention (Attention)

    @nn.compact
    def __call__(
        self, x, context, train: bool = False, ip_hidden_states=(), ip_scales=None, ip_masks=()
    ):
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
                upcast_attention=self.upcast_attention,
                attention_implementation=self.attention_implementation,
                dtype=self.dtype,
                num_ip_adapters=self.num_ip_adapters,
                name=f"transformer_blocks_{i}",
            )(h, context, train, ip_hidden_states, ip_scales, ip_masks)
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
