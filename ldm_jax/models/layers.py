"""Building blocks shared by the U-Net and the VAE, structured like diffusers' modules.

Every submodule is named after its diffusers counterpart, so that a PyTorch parameter path
`down_blocks.0.resnets.1.conv1.weight` is the Flax path `down_blocks_0/resnets_1/conv1/kernel`
(with NCHW/OIHW -> NHWC/HWIO transposes done by the converter). Arrays are NHWC. Parameters are
float32 (`param_dtype`); `dtype` is the compute dtype; group-norm statistics and the attention
softmax are always computed in float32.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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


# ---------------------------------------------------------------- attention kernels
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn")
# Block sizes of the "chunked" kernel. Timing one SD1.5 self-attention (batch 2, 4096 tokens,
# 8 heads x 40, float32) on an idle 2-core AVX-512 Xeon (benchmarks/attention_layer.py,
# 2026-12-03): 512 x 512 526 ms, 1024 x 512 534, 512 x 1024 554, 256 x 1024 558, 1024 x 1024
# 617, 256 x 256 786 (the earlier default; on a loaded machine the sizes were within noise).
# The SD1.5 U-Net forward then took 10.2 s instead of 12.8 s (benchmarks/README.md). A score
# block is B x heads x 1 MiB in float32.
QUERY_CHUNK_SIZE = 512
KEY_CHUNK_SIZE = 512


def _cudnn_supported(q: jax.Array, k: jax.Array, mask) -> bool:
    """Shapes/dtypes for which cuDNN's fused flash attention (via `jax.nn.dot_product_attention`)
    builds: fp16/bf16 inputs, head dim a multiple of 8 and <= 128 (<= 256 from Hopper on), no
    boolean mask (the conditions of jax's `check_is_flash_attention`)."""
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or mask is not None:
        return False
    head_dim = q.shape[-1]
    try:
        capability = float(jax.devices("gpu")[0].compute_capability)
    except (RuntimeError, AttributeError, ValueError):
        return False
    return head_dim % 8 == 0 and head_dim <= (256 if capability >= 9.0 else 128)


def resolve_attention_implementation(implementation: str | None, q, k, mask=None) -> str:
    """The concrete kernel for `implementation` ("auto"/None, "xla", "chunked" or "cudnn").

    "auto" picks, at trace time: cuDNN flash attention on GPU when `_cudnn_supported`, the
    query/key-chunked kernel on CPU (several times faster than materializing the score matrix
    at 4096 tokens, see benchmarks/README.md), else XLA's reference einsum-softmax-einsum.
    """
    if implementation is None or implementation == "auto":
        backend = jax.default_backend()
        if backend == "gpu" and _cudnn_supported(q, k, mask):
            return "cudnn"
        return "chunked" if backend == "cpu" else "xla"
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; "
            f"valid: {', '.join(ATTENTION_IMPLEMENTATIONS)}"
        )
    return implementation


def _pad_axis(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
    """Pad `axis` of x at the end up to a multiple of `multiple` (no-op when it divides)."""
    pad = -x.shape[axis] % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _mask_chunks(mask, qc: int, kc: int, n_q: int, n_k: int):
    """A bool mask broadcastable to [B, N, T, S] -> chunks [n_k, B', N', qc or 1, kc or 1],
    with a leading n_q axis when the mask varies over queries (else None is returned for the
    per-query-chunk part and the chunks are shared by every query chunk)."""
    m = jnp.asarray(mask, bool)
    m = m.reshape((1,) * (4 - m.ndim) + m.shape)
    if m.shape[3] != 1:  # padded keys: -inf in chunk_logits
        m = _pad_axis(m, 3, kc, True).reshape(*m.shape[:3], n_k, kc)
        m = jnp.moveaxis(m, 3, 0)
    else:
        m = jnp.broadcast_to(m[None], (n_k, *m.shape))
    if m.shape[3] == 1:
        return None, m
    m = _pad_axis(m, 3, qc, True)
    m = m.reshape(*m.shape[:3], n_q, qc, m.shape[-1])
    return jnp.moveaxis(m, 3, 0), None


def chunked_dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    scale: float,
    query_chunk_size: int = QUERY_CHUNK_SIZE,
    key_chunk_size: int = KEY_CHUNK_SIZE,
) -> jax.Array:
    """softmax(q k^T * scale) v without the [T, S] score matrix (Rabe & Staats 2021,
    "Self-attention Does Not Need O(n^2) Memory", Sec. 2-3): `lax.map` over query chunks, and
    for each a `lax.scan` over key chunks carrying the running max and sum of the online
    softmax (Milakov & Gimelshein 2018). The key-chunk logits are `jax.checkpoint`ed as in the
    paper, so a backward pass recomputes them instead of storing every score block.

    Args:
      q: [B, T, N, H]; k, v: [B, S, N, H] (any float dtype: logits, softmax and the output
        accumulator are float32; probabilities are cast to v.dtype for the p @ v product, as in
        `jax.nn.dot_product_attention`).
      mask: bool broadcastable to [B, N, T, S], True = attend. Masked logits get jax's large
        negative value (not -inf), so even a fully masked row matches the reference.
      scale: logit multiplier, usually H**-0.5.
      query_chunk_size, key_chunk_size: block sizes; T and S need not be multiples (the last
        block is padded, padded keys get zero weight).
    Returns:
      [B, T, N, H] in q.dtype.
    """
    b, t, n, h = q.shape
    s = k.shape[1]
    qc, kc = min(query_chunk_size, t), min(key_chunk_size, s)
    n_q, n_k = -(-t // qc), -(-s // kc)
    masked_value = -0.7 * float(jnp.finfo(jnp.float32).max)  # jax's _get_large_negative

    def to_chunks(x, size, count):  # [B, L, N, H] -> [count, B, N, size, H]
        x = _pad_axis(jnp.swapaxes(x, 1, 2), 2, size)
        return jnp.moveaxis(x.reshape(*x.shape[:2], count, size, x.shape[-1]), 2, 0)

    q_chunks, k_chunks, v_chunks = (
        to_chunks(q, qc, n_q),
        to_chunks(k, kc, n_k),
        to_chunks(v, kc, n_k),
    )
    q_masks, shared_masks = (None, None) if mask is None else _mask_chunks(mask, qc, kc, n_q, n_k)
    key_starts = jnp.arange(n_k) * kc

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def chunk_logits(q_i, k_j, m_ij, key_start):
        """float32[B, N, qc, kc] scaled logits, user mask and padded keys applied."""
        logits = jnp.einsum("bnqh,bnkh->bnqk", q_i, k_j, preferred_element_type=jnp.float32)
        logits = logits * jnp.float32(scale)
        if m_ij is not None:
            logits = jnp.where(m_ij, logits, masked_value)
        if s % kc:  # only the last chunk has padding, and it also holds >= 1 real key
            valid = key_start + jnp.arange(kc) < s
            logits = jnp.where(valid, logits, -jnp.inf)
        return logits

    def attend(p, v_j):  # unnormalized probabilities @ values, float32 accumulation
        return jnp.einsum(
            "bnqk,bnkh->bnqh", p.astype(v.dtype), v_j, preferred_element_type=jnp.float32
        )

    def attend_query_chunk(args):
        q_i, m_i = args
        m_i = shared_masks if m_i is None else m_i
        if n_k == 1:  # a single key block: the plain softmax, nothing to carry
            logits = chunk_logits(q_i, k_chunks[0], None if m_i is None else m_i[0], 0)
            p = jnp.exp(logits - logits.max(-1, keepdims=True))
            return attend(p, v_chunks[0]) / p.sum(-1, keepdims=True)

        def body(carry, xs):
            acc, row_sum, row_max = carry
            k_j, v_j, m_ij, key_start = xs
            logits = chunk_logits(q_i, k_j, m_ij, key_start)
            new_max = jnp.maximum(row_max, logits.max(-1, keepdims=True))
            correction = jnp.exp(row_max - new_max)  # exp(-inf) = 0 on the first block
            p = jnp.exp(logits - new_max)
            row_sum = row_sum * correction + p.sum(-1, keepdims=True)
            acc = acc * correction + attend(p, v_j)
            return (acc, row_sum, new_max), None

        stats = (*q_i.shape[:-1], 1)
        init = (
            jnp.zeros(q_i.shape, jnp.float32),
            jnp.zeros(stats, jnp.float32),
            jnp.full(stats, -jnp.inf, jnp.float32),
        )
        (acc, row_sum, _), _ = jax.lax.scan(body, init, (k_chunks, v_chunks, m_i, key_starts))
        return acc / row_sum

    if n_q == 1:  # no loop at all for short sequences (e.g. the tiny test models)
        first = None if q_masks is None else q_masks[0]
        out = attend_query_chunk((q_chunks[0], first))[None]
    else:
        out = jax.lax.map(attend_query_chunk, (q_chunks, q_masks))  # [n_q, B, N, qc, H]
    out = jnp.moveaxis(out, 0, 2).reshape(b, n, n_q * qc, h)[:, :, :t]
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    scale: float,
    implementation: str | None = "auto",
) -> jax.Array:
    """softmax(q k^T * scale) v with the kernel named by `implementation` (see
    `resolve_attention_implementation`). q: [B, T, N, H], k, v: [B, S, N, H] -> [B, T, N, H];
    mask: bool broadcastable to [B, N, T, S], True = attend. Softmax is float32 in every kernel."""
    impl = resolve_attention_implementation(implementation, q, k, mask)
    if impl == "chunked":
        # module constants read at call time (tests shrink them to exercise the block loops)
        return chunked_dot_product_attention(
            q,
            k,
            v,
            mask,
            scale=scale,
            query_chunk_size=QUERY_CHUNK_SIZE,
            key_chunk_size=KEY_CHUNK_SIZE,
        )
    if impl == "cudnn" and implementation in (None, "auto"):
        try:  # shapes _cudnn_supported does not know about (e.g. no cuDNN found) fall back
            return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
        except (NotImplementedError, RuntimeError, ValueError):
            impl = "xla"
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl)


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
    `to_out_0`.
    """

    heads: int
    dim_head: int
    qkv_bias: bool = False
    upcast_attention: bool = False  # SD2.1-v: q k^T in float32 (diffusers upcast_attention)
    norm_groups: int | None = None
    norm_eps: float = 1e-6
    implementation: str | None = None  # one of ATTENTION_IMPLEMENTATIONS; None = "auto"
    dtype: Dtype = jnp.float32
    num_ip_adapters: int = 0

    @nn.compact
    def __call__(self, x, context=None, mask=None, ip_hidden_states=(), ip_scales=None):
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
            for i, (k_i, v_i) in enumerate(streams(ip_hidden_states)):
                k_i, v_i = split(k_i), split(v_i)
                if self.upcast_attention:
                    k_i, v_i = k_i.astype(jnp.float32), v_i.astype(jnp.float32)
                out = out + jnp.asarray(ip_scales[i], out_dtype) * attend(k_i, v_i, None)
        out = out.reshape(out.shape[0], out.shape[1], inner)
        out = dense(query_dim, self.dtype, "to_out_0")(out)
        if spatial:
            out = out.reshape(b, hgt, wid, query_dim)
        if self.norm_groups is not None:  # residual_connection=True, rescale_output_factor=1
            out = out + residual
        return out


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
    def __call__(self, x, context, train: bool = False, ip_hidden_states=(), ip_scales=None):
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
            ln("norm2")(x), context, None, ip_hidden_states, ip_scales
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
    def __call__(self, x, context, train: bool = False, ip_hidden_states=(), ip_scales=None):
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
            )(h, context, train, ip_hidden_states, ip_scales)
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
