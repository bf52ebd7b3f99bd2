"""Timing helpers shared by the benchmark scripts: interleaved repeats and a thread report.

Interleaving (A, B, A, B, ...) rather than (A x N, then B x N) spreads the load of a shared,
noisy machine over every contender, and the median (with the spread beside it) is robust to the
runs that a neighbour's job slows down.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1):
    """Seconds per call of each `fn` (which must block until its result is ready), measured
    round-robin: `warmup` untimed rounds, then `repeats` timed rounds. -> {name: [seconds]}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def summary(seconds: list[float]) -> str:
    """'median (min-max, n)' in milliseconds."""
    ms = [1e3 * s for s in seconds]
    return (
        f"median {statistics.median(ms):9.1f} ms  (min {min(ms):.1f}, max {max(ms):.1f}, "
        f"n={len(ms)})"
    )


def thread_report() -> str:
    """The threads each framework uses on this machine. XLA:CPU sizes its intra-op pool to the
    cores this process may run on (it has no runtime knob; restrict it with `taskset`); PyTorch
    reports its own intra-op setting (torch.set_num_threads / OMP_NUM_THREADS)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [f"cores available to this process: {cores} (os.cpu_count()={os.cpu_count()})"]
    lines.append(f"JAX/XLA:CPU intra-op threads: {cores} (one per available core)")
    try:
        import torch

        lines.append(
            f"PyTorch intra-op threads: {torch.get_num_threads()}, "
            f"inter-op: {torch.get_num_interop_threads()}"
        )
    except ImportError:
        pass
    for var in ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var):
            lines.append(f"{var}={os.environ[var]}")
    return "\n".join(lines)
