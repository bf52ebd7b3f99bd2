"""Time one attention op (softmax(q k^T / sqrt(H)) v, no projections) per kernel.

The default shape is SD1.5's largest self-attention at 512 px: batch 2, 64x64 = 4096 tokens,
8 heads x 40. Kernels are timed round-robin (see timing.py) and compared with the first one.

    python benchmarks/attention_layer.py --repeats 9 \
        --impls xla,chunked:256x512,chunked:128x4096,chunked:512x512 --torch

An implementation is "xla", "cudnn" (GPU, bf16/fp16), "auto", or "chunked[:QxK]" with query and
key block sizes (default: ldm_jax.models.attention.QUERY_CHUNK_SIZE x KEY_CHUNK_SIZE).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

# Runnable as a plain script from a checkout: timing.py beside it, ldm_jax one level up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
import numpy as np
from timing import interleaved_times, summary, thread_report

from ldm_jax.models import attention


def attention_fn(impl: str, scale: float):
    """A jitted (q, k, v) -> out for an --impls entry."""
    if impl.startswith("chunked"):
        qc, kc = attention.QUERY_CHUNK_SIZE, attention.KEY_CHUNK_SIZE
        if ":" in impl:
            qc, kc = (int(x) for x in impl.split(":")[1].split("x"))
        fn = functools.partial(
            attention.chunked_dot_product_attention,
            scale=scale,
            query_chunk_size=qc,
            key_chunk_size=kc,
        )
    else:
        fn = functools.partial(attention.dot_product_attention, scale=scale, implementation=impl)
    return jax.jit(fn)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impls", default="xla,chunked", help="comma-separated kernels")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096, help="query length T")
    parser.add_argument("--keys", type=int, default=None, help="key length S (default T)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim-head", type=int, default=40)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--torch", action="store_true", help="also time torch SDPA (CPU)")
    args = parser.parse_args(argv)

    b, t, n, h = args.batch, args.tokens, args.heads, args.dim_head
    s = args.keys or t
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(b, length, n, h)), args.dtype) for length in (t, s, s))
    print(
        f"backend {jax.default_backend()}, q [{b}, {t}, {n}, {h}], k/v [{b}, {s}, {n}, {h}], "
        f"{args.dtype}"
    )
    print(thread_report())

    fns, outputs = {}, {}
    for impl in args.impls.split(","):
        fn = attention_fn(impl, h**-0.5)
        start = time.perf_counter()
        outputs[impl] = np.asarray(fn(q, k, v).block_until_ready(), np.float32)
        print(f"{impl:20s} compile+first call {time.perf_counter() - start:6.1f} s")
        fns[impl] = functools.partial(lambda fn: fn(q, k, v).block_until_ready(), fn)
    if args.torch:
        import torch

        tq, tk, tv = (
            torch.from_numpy(np.asarray(x, np.float32)).transpose(1, 2) for x in (q, k, v)
        )
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def run_torch():
            with torch.no_grad():
                return sdpa(tq, tk, tv)

        outputs["torch_sdpa"] = run_torch().transpose(1, 2).numpy()
        fns["torch_sdpa"] = run_torch

    times = interleaved_times(fns, args.repeats)
    first = next(iter(fns))
    base = np.median(times[first])
    for name, ts in times.items():
        err = np.abs(outputs[name] - outputs[first]).max()
        print(
            f"{name:20s} {summary(ts)}  ratio to {first} {np.median(ts) / base:5.2f}  "
            f"max|diff| {err:.1e}"
        )


if __name__ == "__main__":
    main()
