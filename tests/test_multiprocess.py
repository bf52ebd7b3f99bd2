"""Many hosts on one machine: two processes of two simulated CPU devices each, joined by
jax.distributed with gloo collectives through launch/local.sh, train the autoencoder smoke config.

They must agree on the loss, match a single-process run (the global batch is assembled in the same
order from the two host-local halves), and write one checkpoint that this single process restores.
"""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import FAST_COMPILE_XLA_FLAGS, REPO
from ldm_jax.config import load_config
from ldm_jax.data.pipeline import StepIndexedBatches, load_dataset
from ldm_jax.runs import Checkpointer
from ldm_jax.train import trainer

SHAPES = str(REPO / "configs" / "shapes.py")
STEPS = 4
FIELDS = {"num_train_steps": STEPS, "log_every": 1, "checkpoint_every": 2, "sample_every": 1000}
# The two processes train on a hybrid mesh: data parallel across processes (the granules of the
# slow network, as hosts or slices of a pod), FSDP over the two devices within each.
HYBRID = {"mesh.data": 1, "mesh.fsdp": -1, "dcn_mesh.data": 2}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    load_dataset(load_config(SHAPES + ":autoencoder,smoke", [f"data.data_dir={path}"]))
    return str(path)


def test_each_process_reads_only_its_contiguous_slice(monkeypatch):
    arrays = {"x": np.arange(40)}
    whole = StepIndexedBatches(arrays, 8, seed=3)
    expected = [whole[s]["x"] for s in range(7)]  # crosses an epoch boundary (5 steps/epoch)
    slices = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    for pid in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda pid=pid: pid)
        part = StepIndexedBatches(arrays, 8, seed=3)
        slices.append([part[s]["x"] for s in range(7)])
    for step in range(7):
        a, b = slices[0][step], slices[1][step]
        assert len(a) == len(b) == 4
        np.testing.assert_array_equal(np.concatenate([a, b]), expected[step])


def test_two_processes_train_agree_and_write_a_checkpoint_one_process_restores(data_dir, tmp_path):
    workdir, logs = tmp_path / "run", tmp_path / "logs"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # local.sh sets its own
    env.update(
        PYTHON=sys.executable,
        NUM_PROCESSES="2",
        DEVICES_PER_PROCESS="2",
        LOG_DIR=str(logs),
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
        EXTRA_XLA_FLAGS=FAST_COMPILE_XLA_FLAGS,  # as in this process: the same numerics
    )
    fields = {"data.data_dir": data_dir, **FIELDS, **HYBRID}
    overrides = [f"--config.{k}={v}" for k, v in fields.items()]
    command = [
        "bash",
        str(REPO / "launch" / "local.sh"),
        "--config",
        SHAPES + ":autoencoder,smoke",
        "--workdir",
        str(workdir),
        *overrides,
    ]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    outputs = [(logs / f"process_{i}.log").read_text() for i in (0, 1)]
    assert result.returncode == 0, result.stderr + "\n".join(o[-3000:] for o in outputs)

    # Each process joined the 2-process, 4-device system and logged the same final loss.
    finals = []
    for i, out in enumerate(outputs):
        assert f"process {i} of 2, 2 local / 4 global devices" in out, out[-2000:]
        assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 1} over 4 devices" in out, out[-2000:]
        (loss,) = re.findall(rf"process {i} of 2: step {STEPS} loss (\S+)", out)
        finals.append(float(loss))
    assert finals[0] == finals[1]

    # Only process 0 writes metrics; no gap or duplicate.
    rows = [json.loads(r) for r in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["loss"] == finals[0]

    # One process (this one, 8 devices) restores the checkpoint the two wrote together.
    config = load_config(
        SHAPES + ":autoencoder,smoke",
        [f"{k}={v}" for k, v in {"data.data_dir": data_dir, **FIELDS}.items()],
    )
    reference = trainer.train_and_evaluate(config, tmp_path / "single")
    checkpointer = Checkpointer(workdir, read_only=True)
    assert checkpointer.manager.all_steps() == [2, 4]
    restored = checkpointer.restore_raw(STEPS)
    assert int(restored["step"]) == STEPS

    # The same run as one process of 8 devices: the global batch and the noise are the same, so
    # the first loss agrees to float32 round-off (only the reduction order differs) ...
    ref_rows = [
        json.loads(r) for r in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()
    ]
    np.testing.assert_allclose(rows[0]["loss"], ref_rows[0]["loss"], rtol=1e-6)
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in ref_rows], rtol=1e-4)
    # ... and so do the parameters after 4 Adam steps, up to Adam's amplification of round-off:
    # it divides by sqrt(v), so where a gradient is itself round-off-sized (e.g. a bias that a
    # normalization cancels) its update direction is round-off too and the parameter may move by
    # a fraction of one step's size (the learning rate) differently. Almost all agree to 1e-5.
    learning_rate = config.optimizer.learning_rate
    diffs = np.concatenate(
        [
            np.abs(np.asarray(a) - np.asarray(b)).ravel()
            for a, b in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(reference.params))
        ]
    )
    print(f"max |param diff| {diffs.max():.2e}, share > 1e-5: {np.mean(diffs > 1e-5):.2e}")
    assert diffs.max() < 0.1 * learning_rate, diffs.max()
    assert np.mean(diffs > 1e-5) < 0.01, np.mean(diffs > 1e-5)
