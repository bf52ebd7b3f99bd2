"""benchmarks/gpu_check.sh, the prepared run for a lent GPU: it parses, passes shellcheck, and
its smoke mode (the same parts at tiny sizes) runs to the end on the CPU, so that a session that
is lent a GPU for a few minutes does not spend them on a broken script."""

import os
import subprocess
import sys

import pytest

from conftest import REPO, SHARED, assert_shellcheck_passes

SCRIPTS = [REPO / "benchmarks" / "gpu_check.sh", REPO / "benchmarks" / "gpu_prepare.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_passes_shellcheck(script):
    assert_shellcheck_passes(script)


def test_smoke_run_completes_every_part(tmp_path):
    if (
        not (SHARED / "data" / "clip_tokenizer").exists()
        and not (REPO / ".device" / "clip_tokenizer").exists()
    ):
        pytest.skip("no CLIP tokenizer files")
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_SMOKE": "1", "OUT": str(tmp_path)}
    env["PARTS"] = "attention_self text_to_image finetune_step"
    result = subprocess.run(
        ["bash", str(SCRIPTS[0])], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == [
        "environment",
        "attention_self",
        "text_to_image",
        "finetune_step",
    ]
    assert all(": exit 0 after" in line for line in summary), summary
    t2i = (tmp_path / "text_to_image.log").read_text()
    # the float32 images of ldm_jax and diffusers agree (the script compares them)
    assert "torch[cpu] float32" in t2i and "image max|diff|" in t2i
    assert "FLOPs in-step / precomputed" in (tmp_path / "finetune_step.log").read_text()
    # Parts not named in PARTS are skipped (the environment report always runs).
    env["PARTS"] = "none"
    subprocess.run(["bash", str(SCRIPTS[0])], env=env, capture_output=True, timeout=600)
    assert (tmp_path / "summary.txt").read_text().startswith("environment: exit 0")
    assert len((tmp_path / "summary.txt").read_text().splitlines()) == 1
