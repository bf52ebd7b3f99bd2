"""Attention kernels: softmax(q k^T * scale) v by XLA's fused op, cuDNN's flash attention, or a
chunked (memory-efficient) form for long sequences on CPU (Rabe & Staats 2021, "Self-attention
Does Not Need O(n^2) Memory"), chosen per call by `resolve_attention_implementation`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

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
