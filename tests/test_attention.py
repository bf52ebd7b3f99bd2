"""Attention kernels: the chunked (Rabe & Staats 2021) kernel against a float64 numpy softmax and
against jax's reference `jax.nn.dot_product_attention(implementation="xla")`, in float32 within
1e-5; masks, ragged chunking, gradients, bf16 inputs with a float32 softmax, the "auto" choice,
and a tiny U-Net whose output does not depend on the kernel."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models import attention
from ldm_jax.models.attention import (
    chunked_dot_product_attention,
    dot_product_attention,
    resolve_attention_implementation,
)
from ldm_jax.models.layers import Attention
from ldm_jax.models.unet import unet_from_variant

TOL = 1e-5  # float32 vs the float64 reference; logits here are O(1)


def qkv(b, t, s, n, h, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return tuple(rng.normal(size=(b, length, n, h)).astype(dtype) for length in (t, s, s))


def numpy_attention(q, k, v, mask=None, scale=None):
    """softmax(q k^T * scale) v in float64; masked logits get jax's large negative value."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if mask is not None:
        logits = np.where(mask, logits, -0.7 * np.finfo(np.float32).max)
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize(
    "t, s, qc, kc",
    [
        (64, 64, 16, 16),  # several query and key blocks, exact multiples
        (50, 37, 16, 8),  # ragged: padded last query block and padded last key block
        (33, 77, 8, 512),  # cross-attention shape: one key block, no scan
        (5, 200, 256, 64),  # one query block, key blocks with padding
    ],
)
def test_chunked_matches_reference(t, s, qc, kc):
    q, k, v = qkv(2, t, s, 3, 8)
    scale = 8**-0.5
    out = chunked_dot_product_attention(
        q, k, v, scale=scale, query_chunk_size=qc, key_chunk_size=kc
    )
    assert out.shape == (2, t, 3, 8) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, numpy_attention(q, k, v, scale=scale), atol=TOL, rtol=0)
    xla = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")
    np.testing.assert_allclose(out, xla, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "mask_shape", [(2, 3, 40, 30), (2, 1, 1, 30), (1, 1, 40, 1), (40, 30)], ids=str
)
def test_chunked_mask_matches_xla(mask_shape):
    q, k, v = qkv(2, 40, 30, 3, 8, seed=1)
    mask = np.random.default_rng(2).random(mask_shape) < 0.6
    if len(mask_shape) == 4 and mask_shape[2] > 1 and mask_shape[3] > 1:
        mask[0, 0, 3] = False  # a fully masked row: uniform weights in jax's reference too
    out = chunked_dot_product_attention(
        q, k, v, mask, scale=0.3, query_chunk_size=16, key_chunk_size=8
    )
    full = np.broadcast_to(mask, (2, 3, 40, 30))
    np.testing.assert_allclose(out, numpy_attention(q, k, v, full, 0.3), atol=TOL, rtol=0)
    xla = jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask), scale=0.3)
    np.testing.assert_allclose(out, xla, atol=TOL, rtol=0)


def test_chunked_gradients_match_xla():
    q, k, v = qkv(1, 24, 20, 2, 8, seed=3)
    cotangent = np.random.default_rng(4).normal(size=q.shape).astype(np.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent)

    chunked = lambda q, k, v: chunked_dot_product_attention(
        q, k, v, scale=0.35, query_chunk_size=8, key_chunk_size=6
    )
    xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=0.35, implementation="xla")
    got = jax.grad(loss(chunked), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=TOL, rtol=0)


def test_chunked_bf16_inputs_softmax_in_float32():
    """bf16 q, k, v: every exp/max/sum of the softmax runs on float32 values, and the result is
    the float64 answer for the bf16-rounded inputs up to bf16 output rounding."""
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in qkv(2, 40, 30, 2, 8, seed=5))
    fn = lambda q, k, v: chunked_dot_product_attention(
        q, k, v, scale=8**-0.5, query_chunk_size=16, key_chunk_size=8
    )
    out = fn(q, k, v)
    assert out.dtype == jnp.bfloat16
    want = numpy_attention(*(np.asarray(x.astype(jnp.float32)) for x in (q, k, v)))
    # probabilities are cast to bf16 for p @ v (as jax does) and the output is bf16: ~2**-8.
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), want, atol=2e-2, rtol=0)

    def softmax_dtypes(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("exp", "reduce_max", "reduce_sum", "div"):
                yield from (var.aval.dtype for var in eqn.invars if hasattr(var, "aval"))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from softmax_dtypes(sub)

    dtypes = set(softmax_dtypes(jax.make_jaxpr(fn)(q, k, v).jaxpr))
    assert dtypes == {jnp.dtype(jnp.float32)}, dtypes


def test_auto_resolution_and_bad_name():
    q, k, _ = qkv(1, 8, 8, 1, 8)
    want = {"cpu": "chunked", "gpu": None, "tpu": "xla"}[jax.default_backend()]
    if want is not None:
        assert resolve_attention_implementation("auto", q, k) == want
        assert resolve_attention_implementation(None, q, k) == want
    assert resolve_attention_implementation("xla", q, k) == "xla"
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        dot_product_attention(q, k, k, scale=1.0, implementation="flash")
    x = jnp.zeros((1, 4, 16))
    attn = Attention(heads=2, dim_head=8, implementation="flash")
    with pytest.raises(ValueError, match="valid: auto, xla, chunked, cudnn"):
        jax.eval_shape(lambda: attn.init(jax.random.key(0), x))


def test_tiny_unet_same_output_for_every_cpu_kernel(monkeypatch):
    """The tiny U-Net at 16x16 latents (256 tokens at the top level) with small chunks, so the
    chunked kernel takes the multi-block, padded-key path inside a real network."""
    monkeypatch.setattr(attention, "QUERY_CHUNK_SIZE", 96)
    monkeypatch.setattr(attention, "KEY_CHUNK_SIZE", 80)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 4))
    t = jnp.array([10.0, 900.0])
    ctx = jax.random.normal(jax.random.key(1), (2, 7, 128))
    ref = unet_from_variant("tiny", attention_implementation="xla")
    shapes = jax.eval_shape(lambda: ref.init(jax.random.key(0), x, t, ctx))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(0, 0.05, s.shape).astype(np.float32)), shapes
    )
    want = np.asarray(jax.jit(ref.apply)(params, x, t, ctx))
    for impl in ("chunked", "auto"):
        model = unet_from_variant("tiny", attention_implementation=impl)
        got = np.asarray(jax.jit(model.apply)(params, x, t, ctx))
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, atol=TOL * scale, rtol=0, err_msg=impl)
