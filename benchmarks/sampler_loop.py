"""The samplers' own cost: a 50-step loop with a trivial network, against a network call.

Each sampler runs its whole loop in one jitted function (`lax.fori_loop`). With an identity-like
"network" (model_fn(x, t) = 0.1 x) what remains of a loop's time is the sampler's work: the
per-step combinations of the sample and the output history, noise draws, the loop itself. It is
timed next to two references of the same batch of 64x64x4 latents:
- `bare loop`: a `fori_loop` of as many calls of the same trivial network, plus one multiply-add
  per step -- the least any sampler can cost;
- `conv_in+conv_out`: one call of the first and last layer of the SD U-Net (3x3 convolutions
  4 -> 320 -> 4 channels at 64x64), a lower bound far below a real U-Net call (SD1.5's takes
  seconds on a CPU, see unet_forward.py).
Times are medians over --repeats rounds run round-robin after a warmup round (see timing.py);
compile times (trace + XLA compile of the jitted loop) are measured once per sampler.

    python benchmarks/sampler_loop.py --repeats 15
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# Runnable as a plain script from a checkout: timing.py beside it, ldm_jax one level up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
from timing import interleaved_times, summary, thread_report

from ldm_jax.diffusion import samplers, schedules

DEFAULT_SAMPLERS = (
    "ddim,euler,euler_ancestral,heun,lms,plms,dpmpp_2m,dpmpp_3m_sde,dpmpp_sde,unipc,deis,lcm"
)


def trivial_model(x, t):
    """An identity-like network: cheap, but its output depends on x, so nothing folds away."""
    del t
    return 0.1 * x


def count_calls(name: str, steps: int, schedule) -> int:
    """Network calls of one loop, counted on the host at run time (jax.debug.callback)."""
    calls = []

    def model_fn(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return trivial_model(x, t)

    fn = samplers.get_sampler(name)
    run = jax.jit(lambda z, k: fn(model_fn, z, schedule, steps, k))
    jax.block_until_ready(run(jnp.ones((1, 1, 1, 1)), jax.random.key(0)))
    jax.effects_barrier()
    return len(calls)


def compiled_sampler(name: str, steps: int, schedule, noise, rng):
    """(compile seconds, jitted loop compiled for these shapes)."""
    fn = samplers.get_sampler(name)
    start = time.perf_counter()
    compiled = (
        jax.jit(lambda z, k: fn(trivial_model, z, schedule, steps, k)).lower(noise, rng).compile()
    )
    return time.perf_counter() - start, compiled


def bare_loop(calls: int):
    """A fori_loop of `calls` trivial network calls and one multiply-add each."""

    def run(x):
        def body(i, x):
            t = jnp.full((x.shape[0],), 999.0 - i)
            return 0.9 * x + 0.1 * trivial_model(x, t)

        return jax.lax.fori_loop(0, calls, body, x)

    return jax.jit(run)


def conv_in_out(key, channels: int = 320):
    """(params, jitted call) of SD's conv_in (4 -> 320) and conv_out (320 -> 4), 3x3, NHWC."""
    k1, k2 = jax.random.split(key)
    params = (
        jax.random.normal(k1, (3, 3, 4, channels)) * 0.05,
        jax.random.normal(k2, (3, 3, channels, 4)) * 0.05,
    )
    dn = ("NHWC", "HWIO", "NHWC")

    def call(params, x):
        h = jax.lax.conv_general_dilated(x, params[0], (1, 1), "SAME", dimension_numbers=dn)
        h = jax.nn.silu(h)
        return jax.lax.conv_general_dilated(h, params[1], (1, 1), "SAME", dimension_numbers=dn)

    return params, jax.jit(call)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samplers", default=DEFAULT_SAMPLERS, help="comma-separated names")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=64, help="latent height and width")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds (after warmup)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    args = p.parse_args(argv)

    print(f"JAX {jax.__version__} backend {jax.default_backend()}: {jax.devices()[0].device_kind}")
    print(thread_report())
    schedule = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012)
    shape = (args.batch, args.size, args.size, 4)
    noise = jax.random.normal(jax.random.key(0), shape)
    rng = jax.random.key(1)
    names = args.samplers.split(",")

    fns, calls, compile_s = {}, {}, {}
    for name in names:
        calls[name] = count_calls(name, args.steps, schedule)
        compile_s[name], compiled = compiled_sampler(name, args.steps, schedule, noise, rng)
        fns[name] = lambda c=compiled: jax.block_until_ready(c(noise, rng))
    for n in sorted(set(calls.values())):
        loop = bare_loop(n)
        start = time.perf_counter()
        compiled = loop.lower(noise).compile()
        compile_s[f"bare loop x{n}"] = time.perf_counter() - start
        fns[f"bare loop x{n}"] = lambda c=compiled: jax.block_until_ready(c(noise))
    params, conv = conv_in_out(jax.random.key(2))
    start = time.perf_counter()
    conv_compiled = conv.lower(params, noise).compile()
    compile_s["conv_in+conv_out"] = time.perf_counter() - start
    fns["conv_in+conv_out"] = lambda: jax.block_until_ready(conv_compiled(params, noise))

    times = interleaved_times(fns, args.repeats, args.warmup)
    med = {k: statistics.median(v) for k, v in times.items()}
    conv_ms = 1e3 * med["conv_in+conv_out"]
    print(
        f"\n--- {args.steps}-step loops, batch {args.batch}, {args.size}x{args.size}x4 latents, "
        f"model_fn(x, t) = 0.1 * x"
    )
    for k in fns:
        print(f"{k:24s} {summary(times[k])}  compile {compile_s[k]:.2f} s")
    print(
        "\n| loop | network calls | median | per call | per call - bare loop's | "
        "compile |\n| --- | --- | --- | --- | --- | --- |"
    )
    for name in names:
        n = calls[name]
        per = 1e3 * med[name] / n
        bare = 1e3 * med[f"bare loop x{n}"] / n
        print(
            f"| {name} | {n} | {1e3 * med[name]:.1f} ms | {per:.3f} ms | {per - bare:+.3f} ms | "
            f"{compile_s[name]:.2f} s |"
        )
    for n in sorted(set(calls.values())):
        k = f"bare loop x{n}"
        print(
            f"| {k} | {n} | {1e3 * med[k]:.1f} ms | {1e3 * med[k] / n:.3f} ms | | "
            f"{compile_s[k]:.2f} s |"
        )
    print(
        f"| conv_in+conv_out (one call) | 1 | {conv_ms:.2f} ms | | | "
        f"{compile_s['conv_in+conv_out']:.2f} s |"
    )


if __name__ == "__main__":
    main()
