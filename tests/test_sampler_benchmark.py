"""The sampler benchmark (experiments/sampler_benchmark) runs end to end on a small sample.

The full run (README there) takes minutes; this one runs two samplers at two NFE budgets on 512
points, checks its outputs, that NFE is counted (Heun: 2 calls per step but 1 in the last), and
that a deterministic sampler's error shrinks with NFE towards the noise floor.
"""

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

RUN = pathlib.Path(__file__).resolve().parents[1] / "experiments/sampler_benchmark/run.py"
_spec = importlib.util.spec_from_file_location("sampler_benchmark_run", RUN)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses look their module up
_spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sampler_benchmark")
    argv = ["--out", str(out), "--num-points", "512", "--num-projections", "32"]
    argv += ["--nfe", "4,20", "--only", "heun,dpmpp_2m", "--tuned", ""]
    assert bench.main(argv) == 0
    return out


def test_outputs_are_written(small_run, capsys):
    for name in ("results.json", "results.csv", "table.md", "sw_vs_nfe.png"):
        assert (small_run / name).stat().st_size > 0, name
    table = (small_run / "table.md").read_text()
    assert "| heun |" in table and "| dpmpp_2m |" in table and "noise floor" in table
    csv_lines = (small_run / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 4  # header + 2 samplers x 2 budgets


def test_nfe_is_counted_and_error_shrinks_with_nfe(small_run):
    result = json.loads((small_run / "results.json").read_text())
    rows = {(r["label"], r["nfe_budget"]): r for r in result["rows"]}
    # Heun: 2N - 1 calls; the most steps within the budget, and the NFE actually made.
    assert (rows["heun", 4]["steps"], rows["heun", 4]["nfe"]) == (2, 3)
    assert (rows["heun", 20]["steps"], rows["heun", 20]["nfe"]) == (10, 19)
    assert (rows["dpmpp_2m", 20]["steps"], rows["dpmpp_2m", 20]["nfe"]) == (20, 20)
    floor = result["meta"]["noise_floor"]
    assert 0 < floor < 0.2
    for label in ("heun", "dpmpp_2m"):
        few, many = rows[label, 4]["sw"], rows[label, 20]["sw"]
        assert floor < many < few, (label, floor, many, few)
    assert rows["dpmpp_2m", 20]["sw"] < 3 * floor
    # the converged probability-flow ODE: what deterministic samplers approach
    assert 0 < result["meta"]["ode_limit"] < rows["dpmpp_2m", 4]["sw"]


def test_network_evaluations_match_each_algorithm():
    """The NFE bookkeeping the benchmark checks every run against."""
    v = lambda name, **kw: bench.Variant(name, name, tuple(kw.items()))
    assert bench.steps_for_nfe(v("dpm2"), 5) == (3, 5)
    assert bench.steps_for_nfe(v("pndm"), 10) is None  # its Runge-Kutta warm-up alone takes 12
    assert bench.steps_for_nfe(v("pndm"), 15) == (6, 15)
    assert bench.steps_for_nfe(v("plms"), 5) == (4, 5)
    assert bench.steps_for_nfe(v("dpmpp_sde"), 50) == (25, 49)
    assert bench.steps_for_nfe(v("unipc"), 8) == (8, 8)
    ays = bench.ays_variant(bench.sd_schedule())
    assert bench.steps_for_nfe(ays, 10) == (10, 10) and bench.steps_for_nfe(ays, 8) is None


def test_true_quantiles_give_the_floor_for_exact_samples():
    """An exact sample's distance to the data is at the noise floor; the initial noise is far."""
    setup = bench.make_setup(2048, 16, 32, seed=3, floor_samples=2)
    assert max(setup.floors) < 0.06
    assert bench.sliced_w2(np.asarray(setup.noise), setup.quantiles, setup.dirs) > 0.15
