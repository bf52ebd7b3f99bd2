"""End to end on the smoke config: every CLI command, resume, non-finite losses, bad input.

The two stages are trained once per session (`trained`) and shared by the tests that only read.
"""

import json
import logging
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, train_args
from ldm_jax import cli, pipeline
from ldm_jax import model as model_lib
from ldm_jax import rng as rng_lib
from ldm_jax.config import load_config
from ldm_jax.data.pipeline import StepIndexedBatches
from ldm_jax.model import load_run
from ldm_jax.pipeline import generate
from ldm_jax.runs import Checkpointer
from ldm_jax.train import loop, trainer
from ldm_jax.train import state as state_lib
from ldm_jax.train.objectives import ldm

SHAPES = str(REPO / "configs" / "shapes.py")


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_checkpoints_metrics_and_samples(trained):
    ae, lat = trained
    for workdir in (ae, lat):
        assert Checkpointer(workdir, read_only=True).latest_step() == 6
        rows = _metrics(workdir)
        assert [r["step"] for r in rows] == [2, 4, 6]
        assert all(np.isfinite(r["loss"]) for r in rows)
        assert (workdir / "config.json").exists()
    assert (ae / "samples" / "reconstructions_000006.png").exists()
    assert (lat / "samples" / "step_000006.png").exists()


def test_sample_cli_writes_pngs_grid_and_manifest(trained, tmp_path, caplog, capsys):
    _, lat = trained
    out = tmp_path / "samples"
    long_prompt = "a red circle " * 10  # 30 words: longer than the 16-token context
    with caplog.at_level(logging.WARNING, logger="ldm_jax"):
        code = cli.main(
            [
                "sample",
                "--workdir",
                str(lat),
                "--prompt",
                "a red circle",
                "--prompt",
                long_prompt,
                "--negative-prompt",
                "a blue square",
                "--num-images",
                "2",
                "--guidance-scale",
                "3",
                "--steps",
                "3",
                "--sampler",
                "ddim",
                "--seed",
                "5",
                "--out",
                str(out),
            ]
        )
    assert code == 0
    assert "truncated" in caplog.text
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest) == 4
    assert [m["seed"] for m in manifest] == [5, 6, 7, 8]
    assert manifest[0] == {
        "file": "00000.png",
        "prompt": "a red circle",
        "negative_prompt": "a blue square",
        "seed": 5,
        "sampler": "ddim",
        "steps": 3,
        "guidance_scale": 3.0,
        "guidance_rescale": 0.0,
        "height": 32,
        "width": 32,
        "workdir": str(lat),
    }  # one schema for runs and checkpoints (these carry "pretrained" instead of "workdir")
    for record in manifest:
        assert (out / record["file"]).exists()
    assert (out / "grid.png").exists()
    assert "wrote 4 images" in capsys.readouterr().out


def test_sampling_is_reproducible_and_does_not_recompile(trained):
    _, lat = trained
    model = load_run(lat)
    kwargs = dict(num_inference_steps=3, sampler="ddim", batch_size=8)
    a = generate(
        model, ["a red circle", "a blue square"], seed=[1, 2], guidance_scale=4.0, **kwargs
    )
    b = generate(
        model,
        ["a green triangle", "a blue square", "a red circle"],
        seed=[9, 2, 1],
        negative_prompt=["x", "", ""],
        guidance_scale=[1.0, 4.0, 4.0],
        **kwargs,
    )
    # Same (prompt, seed, guidance) -> same image, whatever the batch-mates.
    np.testing.assert_array_equal(a[0], b[2])
    np.testing.assert_array_equal(a[1], b[1])
    (fn,) = model.cache["compiled"].values()
    assert fn._cache_size() == 1  # new prompts, seeds and guidance scales reused the executable


def test_img2img_with_a_model_trained_here(trained, tmp_path, capsys):
    """`generate(image=..., strength=...)` and `sample --workdir --init-image`: the sampler
    starts part-way from the init image's latents, so few steps stay near them decoded."""
    from PIL import Image

    _, lat = trained
    model = load_run(lat)
    kwargs = dict(num_inference_steps=4, sampler="ddim", batch_size=8, guidance_scale=4.0)
    prompts, seeds = ["a red circle", "a blue square"], [1, 2]
    txt2img = generate(model, prompts, seed=seeds, **kwargs)
    init = np.zeros((32, 32, 3), np.uint8)
    init[8:24, 8:24] = (230, 40, 40)  # a red square on black
    path = tmp_path / "init.png"
    Image.fromarray(init).save(path)
    near = generate(model, prompts, seed=seeds, image=path, strength=0.25, **kwargs)
    # Strength 0.25 of 4 steps runs the last one only, from the init latents noised to its small
    # noise level: the image is (nearly) those latents decoded. (Measured on the smoke model:
    # 0.20 levels from them, against 45 for text-to-image. The smoke VAE reconstructs nothing,
    # so the init image itself is no reference.)
    images = jnp.asarray(np.stack([init, init]), jnp.float32) / 255
    # A posterior sample of each image, its noise from the image's seed (generate's convention).
    posterior = model.vae.apply(model.vae_params, images * 2 - 1, method=model.vae.encode)
    keys = [jax.random.fold_in(jax.random.key(s), 1) for s in seeds]
    eps = jnp.stack([rng_lib.normal(k, posterior.mean.shape[1:]) for k in keys])
    z = posterior.mean + posterior.std * eps
    decoded = model.vae.apply(model.vae_params, z, method=model.vae.decode)
    decoded = np.asarray(jnp.clip(jnp.round((decoded + 1) * 127.5), 0, 255), np.uint8)
    distance = lambda a: np.abs(a.astype(int) - decoded.astype(int)).mean(axis=(1, 2, 3))
    assert np.all(distance(near) < 1.0) and np.all(distance(txt2img) > 20), (
        distance(near),
        distance(txt2img),
    )
    # More steps from the init latents move further from them (5 of 10 steps: 31 levels).
    five = generate(
        model,
        prompts,
        seed=seeds,
        image=init,
        strength=0.5,
        **{**kwargs, "num_inference_steps": 10},
    )
    assert np.all(distance(five) > 10), (distance(five), distance(near))
    with pytest.raises(ValueError, match="one per prompt"):
        generate(model, prompts, seed=seeds, image=[init] * 3, **kwargs)
    # An image depends on its own (prompt, seed, init image) only, not on its batch-mates.
    alone = generate(model, prompts[1:], seed=seeds[1:], image=init, strength=0.25, **kwargs)
    np.testing.assert_array_equal(alone[0], near[1])
    # The CLI writes the same image and records the init image and strength.
    out = tmp_path / "i2i"
    args = ["sample", "--workdir", str(lat), "--prompt", prompts[0], "--seed", "1"]
    args += ["--steps", "4", "--sampler", "ddim", "--guidance-scale", "4"]
    assert (
        cli.main([*args, "--init-image", str(path), "--strength", "0.25", "--out", str(out)]) == 0
    )
    record = json.loads((out / "manifest.json").read_text())[0]
    assert record["init_image"] == str(path) and record["strength"] == 0.25
    # Within one level, not equal: the CLI's progress bar is a host callback inside the sampling
    # loop, another program whose round-off (at the suite's XLA optimization level 0) moved one
    # pixel of the smoke model's image by one level.
    written = np.asarray(Image.open(out / "00000.png")).astype(int)
    assert np.abs(written - near[0]).max() <= 1
    # Bad input is named.
    assert cli.main([*args, "--strength", "0.5", "--out", str(out)]) == 2
    assert "--strength needs --init-image" in capsys.readouterr().err
    assert cli.main([*args, "--init-image", str(tmp_path / "none.png"), "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "broken.png").write_bytes(path.read_bytes()[:40])  # a truncated PNG
    assert cli.main([*args, "--init-image", str(tmp_path / "broken.png"), "--out", str(out)]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert cli.main([*args, "--init-image", str(path), "--mask", str(path), "--out", str(out)]) == 2
    assert "inpainting needs a 9-channel inpainting U-Net" in capsys.readouterr().err
    with pytest.raises(ValueError, match="strength must be in"):
        generate(model, prompts, seed=seeds, image=init, strength=0.0, **kwargs)


def test_ddpm_sampler_and_unknown_sampler(trained, tmp_path, capsys):
    _, lat = trained
    model = load_run(lat)
    images = generate(model, ["a red circle"], seed=[0], num_inference_steps=3, sampler="ddpm")
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8
    code = cli.main(
        [
            "sample",
            "--workdir",
            str(lat),
            "--prompt",
            "x",
            "--sampler",
            "euler-ish",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 2
    assert "unknown sampler 'euler-ish'; valid: ddim, ddpm" in capsys.readouterr().err


def test_eval_adherence_cli(trained, tmp_path, capsys):
    _, lat = trained
    out = tmp_path / "adherence"
    assert (
        cli.main(
            [
                "eval",
                "adherence",
                "--workdir",
                str(lat),
                "--guidance-scales",
                "0",
                "4",
                "--num-per-prompt",
                "1",
                "--steps",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| guidance | n | color | shape | color+shape | position |" in printed
    results = json.loads((out / "results.json").read_text())
    assert [r["guidance"] for r in results["rows"]] == [0.0, 4.0]
    assert results["rows"][0]["n"] == 48  # 24 short + 24 canonical prompts, one image each
    assert (out / "grid_guidance_4.png").exists() and (out / "table.md").exists()


def test_sample_without_checkpoint_says_so(tmp_path, capsys):
    code = cli.main(
        [
            "sample",
            "--workdir",
            str(tmp_path / "empty"),
            "--prompt",
            "a red circle",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    assert "no checkpoint in" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    code = cli.main(
        [
            "sample",
            "--workdir",
            str(tmp_path),
            "--prompt",
            "x",
            "--num-images",
            "0",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2 and "--num-images must be >= 1, got 0" in capsys.readouterr().err


def test_unknown_config_key_is_named(tmp_path, capsys):
    code = cli.main(
        [
            "train",
            "--config",
            SHAPES + ":smoke",
            "--workdir",
            str(tmp_path),
            "--config.unet.block_out_chanels=(8,16)",
        ]
    )
    assert code == 2
    assert "unknown config key 'unet.block_out_chanels'" in capsys.readouterr().err


def test_workdir_of_another_model_is_refused(trained, data_dir, capsys):
    ae, _ = trained
    before = sorted(p.name for p in (ae / "checkpoints").iterdir())
    extra = "--config.autoencoder.block_out_channels=(8,8)"
    code = cli.main(train_args("autoencoder,smoke", ae, data_dir, extra))
    assert code == 2
    err = capsys.readouterr().err
    assert "does not fit the config" in err and "block_out_channels" in err
    assert sorted(p.name for p in (ae / "checkpoints").iterdir()) == before


def test_ldm_needs_a_matching_autoencoder(trained, data_dir, tmp_path, capsys):
    ae, _ = trained
    args = train_args("ldm,smoke", tmp_path, data_dir)
    assert cli.main(args) == 2
    assert "train the autoencoder first" in capsys.readouterr().err
    code = cli.main(
        [*args, f"--config.autoencoder_workdir={ae}", "--config.autoencoder.latent_channels=3"]
    )
    assert code == 2 and "does not match this config" in capsys.readouterr().err


class _Interrupt(Exception):
    pass


def _patch_batches(monkeypatch, fail_at=None, nan_at=None):
    """Make StepIndexedBatches raise at step `fail_at` or give NaN images at step `nan_at`."""
    original = StepIndexedBatches.__getitem__

    def getitem(self, step):
        if step == fail_at:
            raise _Interrupt(f"simulated crash before step {step}")
        batch = original(self, step)
        if step == nan_at:
            batch = dict(batch, image=np.full(batch["image"].shape, np.nan, np.float32))
        return batch

    monkeypatch.setattr(StepIndexedBatches, "__getitem__", getitem)


def _ae_config(data_dir, **overrides):
    config = load_config(SHAPES + ":autoencoder,smoke", [f"data.data_dir={data_dir}"])
    config.log_every = 1
    config.sample_every = 1000
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def test_resume_gives_the_same_next_step_loss(data_dir, tmp_path, monkeypatch):
    config = _ae_config(data_dir)
    straight = trainer.train_and_evaluate(config, tmp_path / "straight")

    _patch_batches(monkeypatch, fail_at=4)
    # Dies before the 5th update: step 4 is logged, the last checkpoint is step 3, so the
    # resumed run redoes step 4 (and its log row replaces the lost one).
    with pytest.raises(_Interrupt):
        trainer.train_and_evaluate(config, tmp_path / "resumed")
    monkeypatch.undo()
    resumed = trainer.train_and_evaluate(config, tmp_path / "resumed")

    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]  # no gap, no duplicate
    loss_a = {r["step"]: r["loss"] for r in a}
    loss_b = {r["step"]: r["loss"] for r in b}
    assert loss_b[4] == loss_a[4]  # the next step after resuming: bit-identical on CPU
    for x, y in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    config = _ae_config(data_dir)
    _patch_batches(monkeypatch, nan_at=4)
    with pytest.raises(loop.NonFiniteLossError, match="step 4.*last good checkpoint"):
        trainer.train_and_evaluate(config, tmp_path)
    checkpointer = Checkpointer(tmp_path, read_only=True)
    assert checkpointer.latest_step() == 3
    state = checkpointer.restore_raw(3)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def test_update_lowers_the_ldm_loss_on_a_fixed_batch():
    config = load_config(SHAPES + ":ldm,smoke")
    model = model_lib.from_config(config)
    rng = np.random.default_rng(0)
    ids = model.tokenizers[0](["a red circle", "a blue square", "a small green triangle", ""] * 2)
    batch = {
        "latent_mean": rng.standard_normal((8, 16, 16, 4)).astype(np.float32),
        "latent_std": np.full((8, 16, 16, 4), 0.1, np.float32),
        "caption_ids": ids,
        "canonical_ids": ids,
    }
    loss_fn = ldm.make_loss_fn(model, config, model.tokenizers[0]([""])[0])
    config.num_train_steps = 40  # (the learning rate schedule's length)
    groups = state_lib.groups_from_config(config, ("unet", "text_encoder"))
    k1, k2 = jax.random.split(jax.random.key(0))

    @jax.jit  # (jitted: op-by-op initialization compiles every op on its own, ~4x slower)
    def init():
        length = config.tokenizer.context_length
        context = jnp.zeros((1, length, config.text_encoder.hidden_size))
        unet = model.unet.init(k1, jnp.zeros((1, 16, 16, 4)), jnp.zeros(1), context)
        text_encoder = model.text_encoders[0].init(k2, jnp.zeros((1, length), jnp.int32))
        return {"unet": unet, "text_encoder": text_encoder}

    state = state_lib.init_state(init(), groups, frozen={"latent_scale": jnp.float32(1.0)})
    update = jax.jit(state_lib.make_update_fn(loss_fn, groups, seed=0))
    fixed = jax.random.key(123)  # the same noise and timesteps before and after
    eval_loss = jax.jit(lambda state: loss_fn(state.params, state.frozen, batch, fixed)[0])
    before = float(eval_loss(state))
    for _ in range(40):
        state, metrics = update(state, batch)
        assert bool(metrics["finite"])
    after = float(eval_loss(state))
    assert after < 0.7 * before, (before, after)


def test_import_ldm_jax_is_light():
    code = (
        "import sys, ldm_jax, ldm_jax.cli, ldm_jax.pipeline, ldm_jax.train.objectives.ldm, "
        "ldm_jax.train.objectives.autoencoder, ldm_jax.eval.adherence; "
        "print(sorted(m for m in ('tensorflow', 'wandb', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_clip_tokenizer_config_builds_a_matching_text_encoder(clip_tokenizer_dir):
    config = load_config(
        SHAPES + ":ldm,smoke",
        [
            "tokenizer.name=clip",
            f"tokenizer.path={clip_tokenizer_dir}",
            "tokenizer.context_length=77",
        ],
    )
    model = model_lib.from_config(config)
    assert (
        model.text_encoders[0].vocab_size == 49408 and model.text_encoders[0].eos_token_id == 49407
    )
    ids = model.tokenizers[0](["a cat sitting on a sunny windowsill", ""])
    params = jax.eval_shape(model.text_encoders[0].init, jax.random.key(0), ids)
    out = jax.eval_shape(model.text_encoders[0].apply, params, ids)
    assert out.last_hidden_state.shape == (2, 77, config.text_encoder.hidden_size)


def test_metric_writer_logs_jsonl_and_wandb_offline(tmp_path):
    from ldm_jax.train.metrics import MetricWriter

    config = load_config(SHAPES + ":ldm,smoke")
    config.wandb.mode = "offline"  # the default of the real configs: no login, files only
    writer = MetricWriter(tmp_path, config, total_steps=4)
    writer.write_scalars(2, {"loss": jnp.float32(0.5)})
    writer.write_scalars(4, {"loss": 0.25})
    writer.close()
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [2, 4] and rows[1]["loss"] == 0.25
    assert "steps_per_sec" in rows[1]
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_unknown_sampler_is_refused_before_loading_a_model(tmp_path, capsys):
    from ldm_jax.diffusion.samplers import sampler_names

    args = ["sample", "--prompt", "a red circle", "--sampler", "eulr", "--out", str(tmp_path)]
    assert cli.main([*args, "--workdir", str(tmp_path / "no_run")]) == 2
    err = capsys.readouterr().err
    assert "unknown sampler 'eulr'" in err and all(name in err for name in sampler_names())
    assert cli.main([*args, "--pretrained", str(tmp_path / "no_checkpoint")]) == 2
    assert "unknown sampler 'eulr'" in capsys.readouterr().err


# (arguments, what the error says): each refused before a model is loaded or a file written.
BAD_SAMPLE_ARGUMENTS = [
    (["--guidance-scale", "nan"], "--guidance-scale must be a finite number, got nan"),
    (["--guidance-scale", "inf"], "--guidance-scale must be a finite number, got inf"),
    (["--guidance-rescale", "nan"], "--guidance-rescale must be a finite number, got nan"),
    (["--seed", "-5"], "--seed must be in [0, 4294967294] for 2 images"),
    (["--seed", str(2**32 - 1)], "--seed must be in [0, 4294967294] for 2 images"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--init-image", "in.png", "--strength", "1.5"], "--strength must be in (0, 1], got 1.5"),
    (["--init-image", "in.png", "--strength", "nan"], "--strength must be a finite number"),
]


@pytest.mark.parametrize("args, message", BAD_SAMPLE_ARGUMENTS)
def test_bad_sample_arguments_are_named_before_loading(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    for source in ("--workdir", "--pretrained"):  # neither exists: loading would fail otherwise
        command = ["sample", source, str(tmp_path / "missing"), "--prompt", "a red circle"]
        assert cli.main([*command, "--num-images", "2", *args, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_sample_out_is_checked_before_sampling_and_never_overwritten(
    trained, tmp_path, capsys, monkeypatch
):
    _, lat = trained
    command = ["sample", "--workdir", str(lat), "--prompt", "a red circle", "--steps", "2"]
    command += ["--num-images", "1"]
    a_file = tmp_path / "picture.png"
    a_file.write_bytes(b"not a folder")

    def sample(*args, **kwargs):
        raise AssertionError("sampled before --out was checked")

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "generate", sample)
        assert cli.main([*command, "--out", str(a_file)]) == 2
    assert f"--out {a_file} is a file, not a folder" in capsys.readouterr().err
    assert a_file.read_bytes() == b"not a folder"

    out = tmp_path / "samples"
    assert cli.main([*command, "--out", str(out)]) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(first) == {"00000.png", "grid.png", "manifest.json"}
    for run in (1, 2):  # an earlier sample is kept; each new one gets a numbered subfolder
        assert cli.main([*command, "--seed", str(run), "--out", str(out)]) == 0
        assert f"to {out / f'{run:03d}'}" in capsys.readouterr().out
        assert json.loads((out / f"{run:03d}" / "manifest.json").read_text())[0]["seed"] == run
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == first

    # The library refuses what the CLI refuses.
    model = load_run(lat)
    with pytest.raises(ValueError, match="guidance_scale must be finite"):
        generate(model, ["x"], seed=[0], guidance_scale=float("nan"))
    with pytest.raises(
        ValueError, match=r"seeds must be integers in \[0, 2\*\*32 - 1\], got \[-5\]"
    ):
        generate(model, ["x"], seed=[-5])


def test_bad_eval_arguments_are_named_before_loading(tmp_path, capsys):
    images, missing = tmp_path / "images", tmp_path / "missing"
    images.mkdir()
    no_run = ["--workdir", str(missing)]
    cases = [
        (
            ["fid", "--images", str(images), "--reference", str(missing / "ref.npz")],
            f"--reference {missing / 'ref.npz'}: no such file",
        ),
        (
            ["fid", *no_run, "--reference", str(missing / "ref.npz")],
            f"--reference {missing / 'ref.npz'}: no such file",
        ),
        (
            ["fid", "--images", str(missing), "--reference", str(images)],
            f"--images {missing}: no such folder",
        ),
        (["fid", *no_run, "--guidance-scale", "nan"], "--guidance-scale must be a finite"),
        (["fid", *no_run, "--steps", "10", "0"], "--steps must be >= 1, got 0"),
        (
            ["fid", *no_run, "--inception-weights", str(missing / "w.pth")],
            f"--inception-weights {missing / 'w.pth'}: no such file",
        ),
        (["adherence", *no_run, "--guidance-scales", "4", "nan"], "--guidance-scales must be"),
        (["adherence", *no_run, "--seed", "-1"], "--seed must be in [0, "),
        (["adherence", *no_run, "--num-per-prompt", "0"], "--num-per-prompt must be >= 1"),
        (["adherence", *no_run, "--sampler", "eulr"], "unknown sampler 'eulr'"),
        (["clip-score", "--images", str(missing), "--clip", str(images)], "--images"),
        (["clip-score", "--images", str(images), "--clip", str(missing)], "--clip"),
        (
            ["fid-reference", "--images", str(missing), "--out", str(tmp_path / "r.npz")],
            f"--images {missing}: no such folder",
        ),
    ]
    for args, message in cases:
        assert cli.main(["eval", *args]) == 2, args
        assert message in capsys.readouterr().err, args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # nothing written


def _random_inception_weights(path):
    """A random FID Inception saved as .safetensors (the real file cannot be downloaded here):
    He-scaled convs, so that the features keep their scale through the 94 layers and FIDs differ."""
    from safetensors.numpy import save_file

    from ldm_jax.convert.naming import params_to_state_dict
    from ldm_jax.models import inception

    model = inception.FIDInceptionV3()
    # jitted: flax's init run eagerly dispatches and compiles the 94 layers' ops one by one (16 s)
    init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 75, 75, 3), jnp.uint8))["params"])
    params = init(jax.random.key(0))
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: v * np.sqrt(2.0) if p[-1].key == "kernel" else v, params
    )
    save_file(params_to_state_dict(params), str(path))
    return path


def test_eval_fid_cli(trained, data_dir, tmp_path, capsys, monkeypatch, clip_tokenizer_dir):
    """`eval fid` by sampler and steps on a trained run; `eval fid-reference` of the dataset
    equals that of the same images written as PNGs, and a folder against its own statistics
    scores 0; mismatched preprocessing and an existing --out are refused."""
    from PIL import Image

    from ldm_jax.data.pipeline import load_dataset
    from ldm_jax.eval import fid

    _, lat = trained
    weights = _random_inception_weights(tmp_path / "inception.safetensors")
    common = ["--inception-weights", str(weights), "--batch-size", "8"]
    out = tmp_path / "fid"
    args = ["eval", "fid", "--workdir", str(lat), "--num-images", "16", "--steps", "2"]
    args += ["--sampler", "ddim", "heun", "--kid-subset-size", "8", "--out", str(out), *common]
    pytest.importorskip("torch")
    import tiny_checkpoints

    tiny_checkpoints.clip_model(tmp_path / "clip", clip_tokenizer_dir)
    assert cli.main([*args, "--clip", str(tmp_path / "clip")]) == 0
    assert "| sampler | steps | NFE | FID | KID x 1e3 | CLIP score |" in capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["sampler"], r["steps"], r["nfe"]) for r in rows] == [("ddim", 2, 2), ("heun", 2, 3)]
    for r in rows:
        assert r["fid"] > 0 and np.isfinite(r["kid"]) and r["kid_subset_size"] == 8
        assert 0 <= r["clip_score"] <= 100 and r["clip_score_std"] >= 0
    assert rows[0]["fid"] != rows[1]["fid"]
    assert (out / "grid_heun_2.png").exists()

    # The test split as PNG files: the folder route and the dataset route agree.
    config = load_config(f"{SHAPES}:ldm,smoke", [f"data.data_dir={data_dir}"])
    images = load_dataset(config, "test")["image"][:12]
    folder = tmp_path / "real"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    from_images, from_config = tmp_path / "images.npz", tmp_path / "config.npz"
    ref_args = ["eval", "fid-reference", "--num-images", "12", *common]
    assert cli.main([*ref_args, "--images", str(folder), "--out", str(from_images)]) == 0
    config_args = ["--config", f"{SHAPES}:ldm,smoke", f"--config.data.data_dir={data_dir}"]
    assert cli.main([*ref_args, *config_args, "--out", str(from_config)]) == 0
    a, b = fid.load_statistics(from_images), fid.load_statistics(from_config)
    np.testing.assert_allclose(a["mu"], b["mu"], rtol=0, atol=1e-6)  # PNG is lossless
    assert a["num_images"] == b["num_images"] == 12
    assert (
        cli.main(
            ["eval", "fid", "--images", str(folder), "--reference", str(from_images)]
            + common
            + ["--kid-subset-size", "6"]
        )
        == 0
    )
    printed = capsys.readouterr().out  # two "wrote statistics" lines, then the JSON result
    result = json.loads(printed[printed.index("{") :])
    assert abs(result["fid"]) < 1e-6 * (1 + float(np.trace(a["sigma"])))

    # --reference with --workdir: the split's captions as prompts, the file as the reference;
    # the same FID as the reference computed in the run from the same 12 images.
    by_run = ["eval", "fid", "--workdir", str(lat), "--num-images", "12", "--steps", "2", *common]
    fids = []
    for extra in ([], ["--reference", str(from_config)]):
        assert cli.main([*by_run, *extra, "--out", str(tmp_path / f"fid{len(fids)}")]) == 0
        fids.append(json.loads((tmp_path / f"fid{len(fids)}" / "results.json").read_text()))
    assert fids[0]["rows"][0]["fid"] == pytest.approx(fids[1]["rows"][0]["fid"], rel=1e-6)

    # Samples of `sample --prompt-file` (one prompt per line) against the reference.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\na green triangle\n")
    samples = tmp_path / "samples"
    sample_args = ["sample", "--workdir", str(lat), "--prompt-file", str(prompts)]
    sample_args += ["--num-images", "2", "--steps", "2", "--out", str(samples)]
    assert cli.main(sample_args) == 0
    manifest = json.loads((samples / "manifest.json").read_text())
    assert [r["prompt"] for r in manifest][::2] == [
        "a red circle",
        "a blue square",
        "a green triangle",
    ]
    capsys.readouterr()
    fid_args = ["eval", "fid", "--images", str(samples), "--reference", str(from_images)]
    assert cli.main([*fid_args, *common, "--kid-subset-size", "6"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed[printed.index("{") :])
    assert result["num_images"] == 6 and result["fid"] > 0  # grid.png is not a sample

    # Bad input: another preprocessing than the reference's; an --out that exists.
    code = cli.main(
        [
            "eval",
            "fid",
            "--images",
            str(folder),
            "--reference",
            str(from_images),
            "--preprocessing",
            "pytorch_fid",
            *common,
        ]
    )
    assert code == 2 and "preprocessing" in capsys.readouterr().err
    before = from_images.read_bytes()
    assert cli.main([*ref_args, "--images", str(folder), "--out", str(from_images)]) == 2
    assert "exists" in capsys.readouterr().err and from_images.read_bytes() == before
    monkeypatch.delenv("LDM_JAX_INCEPTION_WEIGHTS", raising=False)
    code = cli.main(["eval", "fid", "--images", str(folder), "--reference", str(from_images)])
    assert code == 2 and "--inception-weights" in capsys.readouterr().err


def test_progressive_distillation_rounds(trained, data_dir, tmp_path, capsys, caplog):
    """Two rounds on the smoke model (2N = 4 -> 2 -> 1 DDIM steps), sampling the student with
    its own defaults, resuming, and the teachers a round refuses."""
    ae, lat = trained
    first, second = tmp_path / "student_2", tmp_path / "student_1"
    teacher = lambda path: f"--config.distill.teacher_workdir={path}"
    assert cli.main(train_args("distill,smoke", first, data_dir, teacher(lat))) == 0
    losses = [m["loss"] for m in _metrics(first) if "loss" in m]
    assert losses and all(np.isfinite(losses))
    # A rerun resumes at the end (nothing to do) instead of starting over.
    with caplog.at_level(logging.INFO, logger="ldm_jax"):
        assert cli.main(train_args("distill,smoke", first, data_dir, teacher(lat))) == 0
    assert "resumed from" in caplog.text
    steps = "--config.distill.student_steps=1"
    assert cli.main(train_args("distill,smoke", second, data_dir, teacher(first), steps)) == 0

    out = tmp_path / "samples"
    args = ["sample", "--workdir", str(second), "--prompt", "a red circle", "--num-images", "2"]
    assert cli.main([*args, "--out", str(out)]) == 0  # the student's own steps and guidance
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(r["steps"], r["guidance_scale"]) for r in manifest] == [(1, 1.0)] * 2
    student = load_run(second)
    assert set(student.run_frozen()) == {"vae", "latent_scale"}  # no teacher when sampling
    assert student.config.sample.num_steps == 1
    assert dict(student.config.sample.sampler_options) == {"timestep_spacing": "trailing"}

    capsys.readouterr()
    wrong = [  # (teacher, extra overrides, what the error names)
        (first, "--config.distill.student_steps=2", "samples 2 steps; its student takes half"),
        (ae, steps, "holds a 'autoencoder' run"),
        (lat, "--config.distill.student_steps=8", "does not split the 8-step one in two"),
    ]
    for path, extra, message in wrong:
        code = cli.main(
            train_args("distill,smoke", tmp_path / "bad", data_dir, teacher(path), extra)
        )
        assert code == 2 and message in capsys.readouterr().err, message
    # A student may not write into its teacher's run.
    before = sorted(p.name for p in (first / "checkpoints").iterdir())
    code = cli.main(train_args("distill,smoke", first, data_dir, teacher(first), steps))
    assert code == 2 and "is the teacher's run" in capsys.readouterr().err
    assert sorted(p.name for p in (first / "checkpoints").iterdir()) == before


@pytest.mark.slow
def test_finetune_a_run_trained_here(trained, tmp_path):
    """Issue 13: the fine-tuning trainer takes a run trained here as its base (the same `Model` a
    checkpoint loads into; `--config.pretrained=<workdir>`), and `sample --workdir` samples the
    fine-tuned run: its U-Net over the base's VAE and text encoder."""
    from PIL import Image

    _, lat = trained
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        picture = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(picture).save(photos / f"{i}.png")
        (photos / f"{i}.txt").write_text(("a red circle", "a blue square")[i % 2])
    workdir = tmp_path / "finetune"
    args = ["train", "--config", str(REPO / "configs" / "sd15_finetune.py") + ":smoke"]
    args += [f"--config.pretrained={lat}", f"--config.data.path={photos}"]
    args += [f"--config.data.data_dir={tmp_path / 'tfds'}", "--workdir", str(workdir)]
    assert cli.main(args) == 0
    base, tuned = load_run(lat), load_run(workdir)
    assert tuned.kind == base.kind == "run" and tuned.source == str(workdir)
    same = lambda a, b: all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
    assert same(tuned.frozen_params(), base.frozen_params())  # VAE and text encoder kept
    assert not same(tuned.unet_params, base.unet_params)  # the U-Net trained
    out = tmp_path / "samples"
    sample = ["sample", "--workdir", str(workdir), "--prompt", "a red circle", "--steps", "2"]
    assert cli.main([*sample, "--out", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())[0]["workdir"] == str(workdir)
