"""Where the test suite's time goes: a pytest plugin that records, per test, its wall time and
the seconds JAX spent tracing, lowering and compiling (`jax.monitoring` duration events), and a
summary of the records.

    PYTHONPATH=benchmarks SUITE_PROFILE=/tmp/suite.jsonl \\
        .venv/bin/python -m pytest -q -n 2 --dist loadfile -p suite_profile
    python benchmarks/suite_profile.py /tmp/suite.jsonl        # the table

Tests that run the CLI in a subprocess count only as wall time (the events are per process).
With SUITE_PROFILE_PROGRAMS=FILE set, every XLA compilation is also written there (test, function
name, seconds, persistent-cache key, whether the cache answered), so that programs compiled more
than once can be found:

    python benchmarks/suite_profile.py --programs /tmp/programs.jsonl
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

_current: dict = {"id": None, "key": None, "hit": False}
_seconds: dict = collections.defaultdict(lambda: collections.defaultdict(float))


def _listener(event, duration, **kwargs):
    record = _seconds[_current["id"]]
    record[event] += duration
    record[event + "#n"] += 1
    if event == SAVED:
        _current["hit"] = True
    programs = os.environ.get("SUITE_PROFILE_PROGRAMS")
    if event == BACKEND and programs:
        row = {"id": _current["id"], "fun": kwargs.get("fun_name"), "seconds": duration}
        row.update(key=_current["key"], hit=_current["hit"])
        with open(programs, "a") as f:
            f.write(json.dumps(row) + "\n")
        _current.update(key=None, hit=False)


def pytest_configure(config):
    import jax.monitoring
    from jax._src import compilation_cache

    jax.monitoring.register_event_duration_secs_listener(_listener)
    get_cache_key = compilation_cache.get_cache_key

    def recording_get_cache_key(*args, **kwargs):  # the key of the program being compiled
        _current["key"] = get_cache_key(*args, **kwargs)
        return _current["key"]

    compilation_cache.get_cache_key = recording_get_cache_key


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


def programs_summary(path, top: int = 25) -> str:
    """Programs by total compile time, those compiled more than once first."""
    rows = [json.loads(line) for line in open(path)]
    by_key = collections.defaultdict(list)
    for r in rows:
        by_key[r["key"] or f"uncached:{r['fun']}:{r['id']}"].append(r)
    total = sum(r["seconds"] for r in rows)
    hits = sum(r["seconds"] for r in rows if r["hit"])
    small = [r for r in rows if r["seconds"] < 0.5 and not r["hit"]]
    repeated = [g for g in by_key.values() if len(g) > 1]
    again = sum(sum(r["seconds"] for r in g if not r["hit"]) - g[0]["seconds"] for g in repeated)
    lines = [
        f"{len(rows)} compilations, {total:.0f} s; answered by the cache: "
        f"{sum(r['hit'] for r in rows)} ({hits:.0f} s); under 0.5 s: {len(small)} "
        f"({sum(r['seconds'] for r in small):.0f} s); {len(by_key)} distinct programs, "
        f"{len(repeated)} compiled more than once (repeats not from the cache: {again:.0f} s)",
        "",
        "| times | cache hits | seconds | function | tests |",
        "|---:|---:|---:|---|---|",
    ]
    groups = sorted(by_key.values(), key=lambda g: -sum(r["seconds"] for r in g))
    for g in groups[:top]:
        tests = sorted({r["id"].split("::")[-1][:40] for r in g if r["id"]})
        lines.append(
            f"| {len(g)} | {sum(r['hit'] for r in g)} | {sum(r['seconds'] for r in g):.1f} "
            f"| {g[0]['fun']} | {', '.join(tests[:3])}{' ...' if len(tests) > 3 else ''} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "--programs":
        print(programs_summary(sys.argv[2]))
    else:
        print(summary(sys.argv[1]))
