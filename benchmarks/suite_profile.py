"""Where the test suite's time goes: a pytest plugin that records, per test, its wall time and
the seconds JAX spent tracing, lowering and compiling (`jax.monitoring` duration events), and a
summary of the records.

    PYTHONPATH=benchmarks SUITE_PROFILE=/tmp/suite.jsonl \\
        .venv/bin/python -m pytest -q -n 2 --dist loadfile -p suite_profile
    python benchmarks/suite_profile.py /tmp/suite.jsonl        # the table

Tests that run the CLI in a subprocess count only as wall time (the events are per process).
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time

import pytest

BACKEND = "/jax/core/compile/backend_compile_duration"
TRACE = "/jax/core/compile/jaxpr_trace_duration"
LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
SAVED = "/jax/compilation_cache/compile_time_saved_sec"

_current: dict = {"id": None}
_seconds: dict = collections.defaultdict(lambda: collections.defaultdict(float))


def _listener(event, duration, **kwargs):
    record = _seconds[_current["id"]]
    record[event] += duration
    record[event + "#n"] += 1


def pytest_configure(config):
    import jax.monitoring

    jax.monitoring.register_event_duration_secs_listener(_listener)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current["id"] = item.nodeid
    start = time.perf_counter()
    yield  # setup (fixtures included), call and teardown
    record = _seconds.pop(item.nodeid, {})
    row = {"id": item.nodeid, "wall": time.perf_counter() - start}
    row.update({k: record.get(k, 0.0) for k in (BACKEND, BACKEND + "#n", TRACE, LOWER, SAVED)})
    with open(os.environ.get("SUITE_PROFILE", "suite_profile.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    _current["id"] = None


def summary(path, top: int = 30) -> str:
    rows = [json.loads(line) for line in open(path)]
    total = {k: sum(r[k] for r in rows) for k in ("wall", BACKEND, TRACE, LOWER, SAVED)}
    lines = [
        f"{len(rows)} tests, {total['wall']:.0f} s in all (both workers): XLA compilation "
        f"{total[BACKEND]:.0f} s ({sum(r[BACKEND + '#n'] for r in rows):.0f} programs), tracing "
        f"{total[TRACE]:.0f} s, lowering {total[LOWER]:.0f} s; the persistent cache saved "
        f"{total[SAVED]:.0f} s",
        "",
        "| wall s | compile s | programs | trace s | test |",
        "|---:|---:|---:|---:|---|",
    ]
    for r in sorted(rows, key=lambda r: -r["wall"])[:top]:
        lines.append(
            f"| {r['wall']:.1f} | {r[BACKEND]:.1f} | {r[BACKEND + '#n']:.0f} | {r[TRACE]:.1f} | {r['id']} |"
        )
    by_file = collections.defaultdict(float)
    for r in rows:
        by_file[r["id"].split("::")[0]] += r["wall"]
    lines += ["", "| wall s | file |", "|---:|---|"]
    lines += [f"| {s:.0f} | {f} |" for f, s in sorted(by_file.items(), key=lambda x: -x[1])]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(sys.argv[1]))
