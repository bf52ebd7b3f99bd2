"""Faults in training (issue 5): SIGKILL and resume, SIGTERM, partial checkpoints, NaNs, retention.

All on the autoencoder smoke config, the cheapest trainer. The kill test runs the real CLI in a
subprocess and kills it with SIGKILL at a random step; everything else runs in this process.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from ldm_jax import cli
from ldm_jax.config import load_config
from ldm_jax.data.pipeline import StepIndexedBatches
from ldm_jax.runs import Checkpointer, NonFiniteCheckpointError
from ldm_jax.train import loop, trainer
from ldm_jax.train import state as state_lib

SHAPES = str(REPO / "configs" / "shapes.py")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The smoke split prepared once for this module (the CLI subprocesses read it too)."""
    path = tmp_path_factory.mktemp("tfds")
    from ldm_jax.data.pipeline import load_dataset

    load_dataset(load_config(SHAPES + ":autoencoder,smoke", [f"data.data_dir={path}"]))
    return str(path)


def _overrides(data_dir, **fields):
    """Config overrides: the test's data dir, log every step, no sample grids but the last."""
    values = {"data.data_dir": data_dir, "log_every": 1, "sample_every": 1000, **fields}
    return [f"{k}={v}" for k, v in values.items()]


def _config(data_dir, **fields):
    return load_config(SHAPES + ":autoencoder,smoke", _overrides(data_dir, **fields))


def _cli_args(workdir, data_dir, **fields):
    return [
        "train",
        "--config",
        SHAPES + ":autoencoder,smoke",
        "--workdir",
        str(workdir),
        *(f"--config.{o}" for o in _overrides(data_dir, **fields)),
    ]


def _rows(workdir):
    return [json.loads(r) for r in (workdir / "metrics.jsonl").read_text().splitlines()]


def _state_leaves(workdir, step):
    state = Checkpointer(workdir, read_only=True).restore_raw(step)
    return jax.tree_util.tree_flatten_with_path(state)[0]


def _hook_batches(monkeypatch, on_step):
    """Call on_step(step, batch) -> batch whenever the trainer reads the batch of `step`."""
    original = StepIndexedBatches.__getitem__
    monkeypatch.setattr(
        StepIndexedBatches, "__getitem__", lambda self, step: on_step(step, original(self, step))
    )


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(data_dir, tmp_path):
    """Acceptance test of issue 5: kill -9 the CLI mid-run, rerun it, compare with a clean run."""
    fields = dict(num_train_steps=12, checkpoint_every=2)
    reference = tmp_path / "reference"
    trainer.train_and_evaluate(_config(data_dir, **fields), reference)

    seed = random.randrange(2**31)
    kill_after = random.Random(seed).randrange(1, 11)  # kill once this step is logged
    workdir = tmp_path / "killed"
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)
    command = [sys.executable, "-m", "ldm_jax.cli", *_cli_args(workdir, data_dir, **fields)]
    proc = subprocess.Popen(
        command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    log = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if log.exists() and f'"step": {kill_after},' in log.read_text():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    stderr = proc.stderr.read().decode()
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, stderr[-2000:])
    killed_at = max(r["step"] for r in _rows(workdir))
    # Saves are asynchronous: a kill soon after a save started can leave no complete checkpoint
    # yet, and then the rerun must start over (and still end identical).
    saved = Checkpointer(workdir, read_only=True).latest_step()
    assert (saved or 0) <= killed_at < 12, (seed, saved, killed_at)

    resumed = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    if saved is None:
        assert "resumed from" not in resumed.stderr
    else:
        assert f"resumed from {workdir / 'checkpoints'} at step {saved}" in resumed.stderr

    rows, ref_rows = _rows(workdir), _rows(reference)
    assert [r["step"] for r in rows] == list(range(1, 13)), (seed, kill_after)  # no gap/duplicate
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows], (seed, kill_after)
    for (path, a), (_, b) in zip(_state_leaves(workdir, 12), _state_leaves(reference, 12)):
        np.testing.assert_array_equal(a, b, err_msg=f"{jax.tree_util.keystr(path)} (seed {seed})")
    print(f"killed after step {killed_at} (target {kill_after}, seed {seed}); resumed from {saved}")


def test_sigterm_saves_at_the_next_step_and_exits_cleanly(data_dir, tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "run"
    args = _cli_args(workdir, data_dir, num_train_steps=6, checkpoint_every=100)
    before = signal.getsignal(signal.SIGTERM)

    def preempt_during_step_2(step, batch):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the notice arrives while step 2 is prepared
        return batch

    _hook_batches(monkeypatch, preempt_during_step_2)
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "preemption notice (SIGTERM): saved step 3 of 6" in err
    assert "run the same command again to resume" in err
    assert Checkpointer(workdir, read_only=True).latest_step() == 3  # the step boundary after 2
    assert [r["step"] for r in _rows(workdir)] == [1, 2, 3]
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the caller's again

    monkeypatch.undo()
    assert cli.main(args) == 0
    assert [r["step"] for r in _rows(workdir)] == [1, 2, 3, 4, 5, 6]
    assert Checkpointer(workdir, read_only=True).latest_step() == 6


def test_leftover_temporary_checkpoints_are_ignored_and_removed(data_dir, tmp_path):
    workdir = tmp_path / "run"
    trainer.train_and_evaluate(_config(data_dir, num_train_steps=3), workdir)
    ckpt = workdir / "checkpoints"
    # What a save killed half-way leaves: orbax's `<step>.orbax-checkpoint-tmp-<time>` folders,
    # one a truncated copy of a real checkpoint, one nearly empty.
    partial = ckpt / "5.orbax-checkpoint-tmp-1763780000123456"
    shutil.copytree(ckpt / "3", partial)
    for f in partial.rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(f.read_bytes()[:50])
    (ckpt / "4.orbax-checkpoint-tmp-1763780000000001" / "state").mkdir(parents=True)

    reader = Checkpointer(workdir, read_only=True)
    assert reader.latest_step() == 3 and reader.manager.all_steps() == [3]

    state = trainer.train_and_evaluate(_config(data_dir, num_train_steps=4), workdir)
    assert int(state.step) == 4
    assert sorted(p.name for p in ckpt.iterdir()) == ["3", "4"]  # temporaries deleted
    assert [r["step"] for r in _rows(workdir)] == [1, 2, 3, 4]


def test_nonfinite_updates_are_skipped_counted_and_stop_the_run(data_dir, tmp_path, monkeypatch):
    def nan_images(step, batch):
        if step in (1, 3, 4):
            return dict(batch, image=np.full(batch["image"].shape, np.nan, np.float32))
        return batch

    _hook_batches(monkeypatch, nan_images)
    config = _config(
        data_dir,
        num_train_steps=8,
        checkpoint_every=1,
        max_checkpoints_to_keep=10,
        max_consecutive_nonfinite=2,
    )
    with pytest.raises(loop.NonFiniteLossError, match=r"at step 4: .* 2 step\(s\) in a row"):
        trainer.train_and_evaluate(config, tmp_path)
    rows = {r["step"]: r for r in _rows(tmp_path)}
    assert sorted(rows) == [1, 2, 3, 4, 5]  # every step logged, skipped or not
    assert [rows[s]["skipped_updates"] for s in sorted(rows)] == [0, 1, 1, 2, 3]
    assert np.isnan(rows[2]["loss"]) and np.isfinite(rows[3]["loss"])
    checkpointer = Checkpointer(tmp_path, read_only=True)
    steps = checkpointer.manager.all_steps()
    assert steps and max(steps) <= 5
    for step in steps:
        state = checkpointer.restore_raw(step)
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"])), step
    # Skipped updates leave the parameters exactly as they were: step 2 (skipped) == step 1.
    after_1, after_2 = checkpointer.restore_raw(1), checkpointer.restore_raw(2)
    for a, b in zip(jax.tree.leaves(after_1["params"]), jax.tree.leaves(after_2["params"])):
        np.testing.assert_array_equal(a, b)
    assert int(after_2["num_skipped"]) == 1 and int(after_2["step"]) == 2


def test_a_checkpoint_never_holds_nonfinite_params(tmp_path):
    params = {"w": jnp.array([1.0, jnp.nan]), "b": jnp.zeros(2)}
    state = state_lib.TrainState(
        step=jnp.int32(1), params={"w": params}, ema_params={}, opt_state={}
    )
    checkpointer = Checkpointer(tmp_path)
    with pytest.raises(NonFiniteCheckpointError, match="refusing to save step 1"):
        checkpointer.save(1, state, {})
    checkpointer.close()
    assert checkpointer.latest_step() is None


def test_same_config_and_seed_give_the_same_losses(data_dir, tmp_path):
    losses = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        trainer.train_and_evaluate(_config(data_dir, num_train_steps=4, seed=seed), tmp_path / name)
        losses.append([r["loss"] for r in _rows(tmp_path / name)])
    assert losses[0] == losses[1]  # bit-identical
    assert losses[0] != losses[2]  # and the seed matters (init, data order, noise)


def test_retention_and_data_position(data_dir, tmp_path, capsys):
    fields = dict(num_train_steps=9, checkpoint_every=1, max_checkpoints_to_keep=2)
    args = _cli_args(tmp_path, data_dir, keep_checkpoint_every=4, **fields)
    assert cli.main(args) == 0
    checkpointer = Checkpointer(tmp_path, read_only=True)
    assert checkpointer.manager.all_steps() == [4, 8, 9]  # every 4th, plus the newest two
    assert checkpointer.read_meta(9)["data"] == {
        "kind": "StepIndexedBatches",
        "next_step": 9,
        "seed": 0,
        "global_batch_size": 16,
        "num_examples": 512,
    }
    # Resuming with another batch size would give other batches from step 9 on: refused.
    args = _cli_args(tmp_path, data_dir, num_train_steps=12, batch_size=8)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert (
        "would change the data order" in err and "global_batch_size: checkpoint 16 vs now 8" in err
    )


def test_frozen_weights_left_out_of_checkpoints_come_back_checked(tmp_path):
    """`loop.run(frozen_fingerprint=...)` (the finetune stage): checkpoints drop state.frozen and
    record the fingerprint; a resume rebuilds frozen with init_fn, refuses another fingerprint,
    and still reads a checkpoint written with the frozen weights inside (the earlier format)."""
    config = load_config(SHAPES + ":autoencoder,smoke", ["checkpoint_every=1", "log_every=1"])
    frozen = {"target": np.full((4,), 3.0, np.float32)}

    def init_fn(frozen):
        return {"w": jnp.zeros((4,), jnp.float32)}, frozen

    def loss_fn(params, frozen, batch, rng):
        del rng
        return jnp.mean((params["w"] - frozen["target"]) ** 2) + 0 * batch["x"].sum(), {}

    batches = StepIndexedBatches({"x": np.arange(8, dtype=np.float32)}, 8, 0)

    def run(steps, fingerprint):
        with config.unlocked():
            config.num_train_steps = steps
        return loop.run(
            config,
            tmp_path,
            init_fn=init_fn,
            init_args=(frozen,),
            phases=loss_fn,
            groups={"w": state_lib.ParamGroup(state_lib.make_optimizer(config.optimizer, 10))},
            batches=batches,
            signature={"toy": 1},
            frozen_fingerprint=fingerprint,
        )

    def saved(step):
        checkpointer = Checkpointer(tmp_path, read_only=True)
        return checkpointer.restore_raw(step), checkpointer.read_meta(step)

    run(2, None)  # frozen weights inside, as every stage wrote them before
    state, meta = saved(2)
    np.testing.assert_array_equal(state["frozen"]["target"], frozen["target"])
    assert "frozen_fingerprint" not in meta
    run(3, "abc")  # resumes from that; saves step 3 without them
    state, meta = saved(3)
    assert not state.get("frozen") and meta["frozen_fingerprint"] == "abc"
    last = run(4, "abc")  # rebuilt from init_args
    np.testing.assert_array_equal(np.asarray(last.frozen["target"]), frozen["target"])
    assert int(last.step) == 4
    with pytest.raises(loop.CheckpointMismatchError, match="other frozen weights"):
        run(5, "xyz")
