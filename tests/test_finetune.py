"""Fine-tuning a pretrained checkpoint (issue 3, "Fine-tuning"), end to end and against diffusers.

Tiny random SD1- and SDXL-style diffusers checkpoints (tests/tiny_checkpoints.py) are fine-tuned
through `ldm-jax train --config configs/sd15_finetune.py:smoke` (and sdxl_finetune.py) on a tiny
local folder of PNGs with .txt captions. The loss of one batch is checked against the same step
written with diffusers / transformers in torch (the computation of diffusers'
train_text_to_image*.py scripts), on the same noise, timesteps, flips and dropped captions.
"""

import json
import logging
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from ldm_jax import cli
from ldm_jax.config import load_config
from ldm_jax.convert import load_pretrained
from ldm_jax.data import caption_batches
from ldm_jax.runs import Checkpointer, params_fingerprint
from ldm_jax.train.objectives import finetune

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import tiny_checkpoints as tiny  # noqa: E402 (needs torch, diffusers: after the skips above)

CONFIGS = {
    "sd15": REPO / "configs" / "sd15_finetune.py",
    "sdxl": REPO / "configs" / "sdxl_finetune.py",
    "sdxl_lora": REPO / "configs" / "sdxl_lora.py",
}
SIZE = 16  # the smoke configs' image size: 8 x 8 latents
# (height, width) of the collection's images: square, wide, tall, larger ones (downscaled).
PHOTOS = [(16, 16), (16, 24), (24, 16), (20, 30), (32, 32), (16, 20), (18, 18), (40, 16)]
# One U-Net level (with cross-attention, as SD's first): half the compile time of two levels; the
# training step's compilation is what these tests spend their time on.
ONE_LEVEL = dict(
    block_out_channels=(32,),
    down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("CrossAttnUpBlock2D",),
)
COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of 8 PNGs with .txt captions; a TFDS data_dir to prepare it in."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i, shape in enumerate(PHOTOS):
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(root / f"{i}.png")
        caption = f"a {COLORS[i % 4]} {SHAPES[i % 2]}, photo {i}"
        (root / f"{i}.txt").write_text(caption)
    return root, tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, clip_tokenizer_dir):
    """{"sd15": (folder, pipe), "sdxl": (folder, pipe)}: tiny random diffusers checkpoints."""
    out = {}
    sdxl_level = dict(attention_head_dim=(2,), transformer_layers_per_block=(2,))
    for name, build, kwargs in (
        ("sd15", tiny.sd_pipeline, ONE_LEVEL),
        ("sdxl", tiny.sdxl_pipeline, {**ONE_LEVEL, **sdxl_level}),
    ):
        pipe = build(clip_tokenizer_dir, **kwargs)
        folder = tmp_path_factory.mktemp(f"tiny_{name}")
        pipe.save_pretrained(folder, safe_serialization=True)
        out[name] = folder, pipe
    return out


def _cli_args(command, name, checkpoint, photos, *extra):
    """`ldm-jax <command>` with the smoke config of `name` on this checkpoint and photos."""
    root, data_dir = photos
    return [
        command,
        "--config",
        f"{CONFIGS[name]}:smoke",
        f"--config.pretrained={checkpoint}",
        f"--config.data.path={root}",
        f"--config.data.data_dir={data_dir}",
        *extra,
    ]


def _train_args(name, workdir, checkpoint, photos, *extra):
    return _cli_args("train", name, checkpoint, photos, "--workdir", str(workdir), *extra)


def _config(name, checkpoint, photos, *overrides):
    """The smoke config of `name` on this checkpoint and photos, with more overrides."""
    root, data_dir = photos
    paths = [f"pretrained={checkpoint}", f"data.path={root}", f"data.data_dir={data_dir}"]
    return load_config(f"{CONFIGS[name]}:smoke", [*paths, *overrides])


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _assert_trees(a, b, equal: bool):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    same = [np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b)]
    assert all(same) if equal else not all(same)


@pytest.fixture(scope="module")
def sd15_run(tmp_path_factory, checkpoints, photos):
    """A 2-step run of sd15_finetune.py:smoke, then the same command to 3 steps (a resume)."""
    folder, _ = checkpoints["sd15"]
    workdir = tmp_path_factory.mktemp("runs") / "sd15"
    args = _train_args("sd15", workdir, folder, photos)
    assert cli.main(args + ["--config.num_train_steps=2"]) == 0
    log = logging.getLogger("ldm_jax")
    records, level = [], log.level
    handler = logging.Handler()
    handler.emit = records.append
    log.addHandler(handler)
    log.setLevel(logging.INFO)  # pytest's handlers on the root logger make basicConfig a no-op
    try:
        assert cli.main(args) == 0  # num_train_steps = 3
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    messages = [r.getMessage() for r in records]
    return workdir, messages, Checkpointer(workdir, read_only=True).restore_raw(3)


@pytest.mark.slow
def test_sd15_finetune_trains_only_the_unet_and_resumes(sd15_run, checkpoints):
    workdir, messages, last = sd15_run
    folder, _ = checkpoints["sd15"]
    assert any(m.startswith("resumed from") and m.endswith("at step 2") for m in messages)
    rows = _metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3]  # the resumed run appended step 3 only
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["mse"]) for r in rows)
    assert all(r["skipped_updates"] == 0 for r in rows)
    original = load_pretrained(folder)
    # The frozen VAE and text encoder stay out of the checkpoints: their fingerprint is recorded.
    assert not last.get("frozen")
    meta = Checkpointer(workdir, read_only=True).read_meta(3)
    assert meta["frozen_fingerprint"] == params_fingerprint(finetune.frozen_params(original))
    _assert_trees(last["params"]["unet"], original.unet_params, equal=False)
    _assert_trees(last["ema_params"]["unet"], original.unet_params, equal=False)
    assert (workdir / "samples" / "step_000003.png").exists()  # EMA U-Net through generate


@pytest.mark.slow
def test_sd15_export_loads_in_ldm_jax_and_diffusers(sd15_run, checkpoints):
    workdir, _, last = sd15_run
    export = workdir / "export"
    ours = load_pretrained(export)
    assert ours.kind == "sd1"
    _assert_trees(ours.unet_params, last["ema_params"]["unet"], equal=True)  # export_ema=True
    original = load_pretrained(checkpoints["sd15"][0])
    _assert_trees(ours.vae_params, original.vae_params, equal=True)
    _assert_trees(ours.text_encoder_params, original.text_encoder_params, equal=True)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(export)
    assert isinstance(pipe.unet, diffusers.UNet2DConditionModel)
    theirs = diffusers.UNet2DConditionModel.from_pretrained(export / "unet").eval()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, SIZE // 2, SIZE // 2)).astype(np.float32)
    t = np.array([10.0, 700.0], np.float32)
    context = rng.standard_normal((2, 77, 32)).astype(np.float32)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context))
    got = jax.jit(ours.unet.apply)(ours.unet_params, x.transpose(0, 2, 3, 1), t, context)
    expected = expected.sample.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4)
    # export_checkpoint: the same folder from a checkpoint, here with the trained weights.
    raw = finetune.export_checkpoint(workdir, workdir / "export_raw", ema=False)
    _assert_trees(load_pretrained(raw).unet_params, last["params"]["unet"], equal=True)


@pytest.mark.slow
def test_resume_and_export_refuse_a_changed_pretrained_checkpoint(
    sd15_run, checkpoints, photos, tmp_path, capsys
):
    """The frozen weights come from config.pretrained again: if it changed, a resume and an
    export of the run say so instead of training on (or exporting) other weights."""
    from safetensors.numpy import load_file, save_file

    workdir, folder = tmp_path / "run", tmp_path / "changed"
    shutil.copytree(sd15_run[0], workdir)
    shutil.copytree(checkpoints["sd15"][0], folder)
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(vae_file)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + np.float32(1e-3)
    save_file(tensors, vae_file, metadata={"format": "pt"})
    assert cli.main(_train_args("sd15", workdir, folder, photos, "--config.num_train_steps=4")) == 2
    assert "other frozen weights" in capsys.readouterr().err
    assert Checkpointer(workdir, read_only=True).latest_step() == 3  # nothing was written
    config = json.loads((workdir / "config.json").read_text())
    (workdir / "config.json").write_text(json.dumps({**config, "pretrained": str(folder)}))
    with pytest.raises(ValueError, match="no longer holds the VAE"):
        finetune.export_checkpoint(workdir, tmp_path / "export")


@pytest.mark.slow
def test_sdxl_finetune_end_to_end(tmp_path, checkpoints, photos):
    folder, _ = checkpoints["sdxl"]
    workdir = tmp_path / "sdxl"
    # With random crops (center crops: the sd15 run; the SDXL loss test against diffusers).
    args = _train_args("sdxl", workdir, folder, photos, "--config.num_train_steps=2")
    assert cli.main(args + ["--config.sample.prompts=()", "--config.data.random_crop=True"]) == 0
    assert all(np.isfinite(r["loss"]) for r in _metrics(workdir))
    original = load_pretrained(folder)
    state = Checkpointer(workdir, read_only=True).restore_raw(2)
    assert not state.get("frozen")
    _assert_trees(state["params"]["unet"], original.unet_params, equal=False)
    exported = load_pretrained(workdir / "export")
    assert exported.kind == "sdxl"
    _assert_trees(exported.unet_params, state["ema_params"]["unet"], equal=True)
    _assert_trees(exported.vae_params, original.vae_params, equal=True)
    _assert_trees(exported.text_encoder_params, original.text_encoder_params, equal=True)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(workdir / "export")
    assert pipe.config.force_zeros_for_empty_prompt
    # The builder recorded each image's size and center-crop corner for SDXL's time ids.
    config = load_config(f"{CONFIGS['sdxl']}:smoke", [f"pretrained={folder}"])
    config.data.update(path=str(photos[0]), data_dir=str(photos[1]))
    batches = caption_batches.make_batches(config, original)
    batch, idx = batches[0], batches.examples.indices(0)
    for size, crop, i in zip(batch["original_size"], batch["crop_top_left"], idx):
        h, w = PHOTOS[int(i)]  # files sort as 0.png .. 7.png
        assert tuple(size) == (h, w)
        short = min(h, w)
        new_h, new_w = SIZE * h // short, SIZE * w // short
        assert tuple(crop) == (round((new_h - SIZE) / 2), round((new_w - SIZE) / 2))


def test_sdxl_lora_with_both_text_encoders_end_to_end(tmp_path, checkpoints, photos):
    """configs/sdxl_lora.py:smoke with a text-encoder LoRA: groups "lora" and
    "text_encoder_lora" (an adapter of each encoder) train; the file written at the end loads
    in diffusers' SDXL pipeline, whose second encoder then gives the outputs ours gives."""
    import torch

    from ldm_jax.convert.lora import read_lora
    from ldm_jax.model import with_lora

    folder, _ = checkpoints["sdxl"]
    workdir = tmp_path / "sdxl_lora"
    extra = ["--config.num_train_steps=2", "--config.sample.prompts=()"]
    extra += ["--config.lora.text_encoder_targets=('q_proj','v_proj','out_proj')"]
    extra += ["--config.param_groups.text_encoder_lora.learning_rate=0.05"]  # a visible change
    assert cli.main(_train_args("sdxl_lora", workdir, folder, photos, *extra)) == 0
    state = Checkpointer(workdir, read_only=True).restore_raw(2)
    assert set(state["params"]) == {"lora", "text_encoder_lora"}
    assert set(state["params"]["text_encoder_lora"]) == {"text_encoder", "text_encoder_2"}
    file = workdir / "pytorch_lora_weights.safetensors"
    assert set(read_lora(file)) == {"unet", "text_encoder", "text_encoder_2"}
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.load_lora_weights(workdir)
    ours = with_lora(load_pretrained(folder), [file])
    ids = np.array([[49406, 320, 736, 2760, 49407] + [49407] * 72], np.int32)
    with torch.no_grad():
        want = pipe.text_encoder_2(torch.from_numpy(ids).long()).text_embeds.numpy()
    got = ours.text_encoders[1].apply(ours.text_encoder_params[1], ids).text_embeds
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    base = load_pretrained(folder)
    before = base.text_encoders[1].apply(base.text_encoder_params[1], ids).text_embeds
    assert np.abs(np.asarray(before) - want).max() > 1e-3  # the adapter was applied


def _torch_loss(name, pipe, folder, batch, captions, draws, prediction_type, weighting):
    """The step of diffusers' train_text_to_image(_sdxl).py on the same inputs and noise."""
    from diffusers.training_utils import compute_snr

    nchw = lambda a: torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy())
    images = torch.from_numpy(batch["image"].astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    flip = torch.from_numpy(np.asarray(draws["flip"]))
    images = torch.where(flip[:, None, None, None], torch.flip(images, dims=[3]), images)
    drop = np.asarray(draws["drop"])
    with torch.no_grad():
        posterior = pipe.vae.encode(images).latent_dist
        latents = posterior.mean + posterior.std * nchw(draws["posterior"])
        latents = latents * pipe.vae.config.scaling_factor
        added = {}
        if name == "sd15":  # dropped captions -> "" (tokenize_captions)
            texts = ["" if d else c for c, d in zip(captions, drop)]
            ids = pipe.tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt")
            context = pipe.text_encoder(ids.input_ids)[0]
        else:  # the SDXL script's encode_prompt; dropped rows zeroed as sgm's conditioner does
            states = []
            for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder),
                                       (pipe.tokenizer_2, pipe.text_encoder_2)):  # fmt: skip
                ids = tokenizer(
                    captions, padding="max_length", truncation=True, return_tensors="pt"
                )
                out = encoder(ids.input_ids, output_hidden_states=True)
                states.append(out.hidden_states[-2])
            keep = torch.from_numpy(1.0 - drop.astype(np.float32))
            context = torch.cat(states, dim=-1) * keep[:, None, None]
            time_ids = np.concatenate(
                [batch["original_size"], batch["crop_top_left"], np.full((len(drop), 2), SIZE)], 1
            )
            added = {
                "text_embeds": out[0] * keep[:, None],
                "time_ids": torch.from_numpy(time_ids.astype(np.float32)),
            }
        scheduler = diffusers.DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        scheduler.register_to_config(prediction_type=prediction_type)
        noise = nchw(draws["noise"]) + 0.1 * nchw(draws["offset"])  # noise_offset = 0.1
        t = torch.from_numpy(np.asarray(draws["t"]).astype(np.int64))
        noisy = scheduler.add_noise(latents, noise, t)
        pred = pipe.unet(noisy, t, context, added_cond_kwargs=added or None).sample
        if prediction_type == "epsilon":
            target = noise
        else:
            target = scheduler.get_velocity(latents, noise, t)
        mse = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        if weighting == "min_snr":  # the script's weights for epsilon: min(snr, 5) / snr
            snr = compute_snr(scheduler, t)
            return float((mse * torch.clamp(snr, max=5.0) / snr).mean())
        return float(mse.mean())


@pytest.mark.parametrize(
    "scheduler_config",
    [
        # A partial file: the betas DDPMScheduler defaults to (linear 1e-4 .. 0.02), not SD's.
        {"_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction"},
        {
            "_class_name": "PNDMScheduler",
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "rescale_betas_zero_snr": True,
            "skip_prk_steps": True,
        },
    ],
    ids=["partial", "zero-snr"],
)
def test_training_schedule_reads_the_checkpoint_as_diffusers(scheduler_config):
    """`DDPMScheduler.from_config(<the checkpoint's scheduler config>)`, as the scripts do."""
    model = types.SimpleNamespace(scheduler_config=scheduler_config)
    schedule, prediction_type = finetune.training_schedule(model)
    ref = diffusers.DDPMScheduler.from_config(scheduler_config)
    np.testing.assert_allclose(
        np.asarray(schedule.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-7
    )
    assert prediction_type == ref.config.prediction_type


@pytest.mark.parametrize(
    "name, prediction_type, weighting",
    [("sd15", "", "min_snr"), ("sdxl", "v_prediction", "none")],
)
def test_loss_matches_diffusers_training_step(checkpoints, name, prediction_type, weighting):
    folder, pipe = checkpoints[name]
    overrides = [
        f"pretrained={folder}",
        f"prediction_type={prediction_type}",
        f"loss_weighting={weighting}",
        "noise_offset=0.1",
    ]
    config = load_config(f"{CONFIGS[name]}:smoke", overrides)
    model = finetune.load_model(config)
    objective = finetune.make_objective(config, model)
    assert objective.prediction_type == (prediction_type or "epsilon")
    assert objective.uncond == ("empty_prompt" if name == "sd15" else "zeros")
    rng = np.random.default_rng(2)
    n = 4
    captions = ["a red circle", "a photo of a dog", "x", "a very long caption " * 20]
    batch = {
        "image": rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8),
        "input_ids": tuple(caption_batches.token_ids(t, captions) for t in model.get_tokenizers()),
        "original_size": np.array([[40, 56], [16, 16], [16, 30], [64, 32]], np.int32),
        "crop_top_left": np.array([[3, 0], [0, 0], [0, 7], [8, 0]], np.int32),
    }
    latent = (n, SIZE // 2, SIZE // 2, 4)
    draws = {
        "posterior": rng.standard_normal(latent).astype(np.float32),
        "noise": rng.standard_normal(latent).astype(np.float32),
        "offset": rng.standard_normal((n, 1, 1, 4)).astype(np.float32),
        "t": np.array([0, 999, 421, 77], np.int32),
        "drop": np.array([False, True, False, True]),
        "flip": np.array([True, False, False, True]),
        "dropout": jax.random.key(0),
    }
    step = jax.jit(lambda p, f, b, d: finetune.loss_with_draws(objective, p, f, b, d))
    frozen = finetune.frozen_params(model)
    loss, aux = step(model.unet_params, frozen, batch, draws)
    expected = _torch_loss(
        name, pipe, folder, batch, captions, draws, objective.prediction_type, weighting
    )
    tolerance = 1e-4 * abs(expected) + 1e-5
    assert abs(float(loss) - expected) <= tolerance, (float(loss), expected)
    assert np.isfinite(float(aux["mse"]))
    # Dropping captions changes the loss by more than that: the check above is not vacuous.
    kept = step(model.unet_params, frozen, batch, {**draws, "drop": np.zeros(n, bool)})[0]
    assert abs(float(kept) - expected) > 3 * tolerance, (float(kept), expected)


# --- Precomputed latents (`ldm-jax encode` with a finetune config). ---


def _encode_args(name, checkpoint, photos, out, *extra):
    return _cli_args("encode", name, checkpoint, photos, "--out", str(out), *extra)


@pytest.fixture(scope="module")
def sd15_latents(tmp_path_factory, checkpoints, photos):
    """The photos encoded with the tiny SD1.5 VAE, 3 per call (the last call padded)."""
    folder, _ = checkpoints["sd15"]
    out = tmp_path_factory.mktemp("latents") / "sd15"
    assert cli.main(_encode_args("sd15", folder, photos, out, "--batch-size", "3")) == 0
    return out


def test_precomputed_latents_give_the_loss_of_in_step_encoding(checkpoints, photos, sd15_latents):
    folder, _ = checkpoints["sd15"]
    meta = json.loads((sd15_latents / "meta.json").read_text())
    assert meta["stage"] == "finetune" and meta["num_examples"] == len(PHOTOS)
    assert set(meta["columns"]) == {
        "latent_mean",
        "latent_std",
        "latent_mean_flipped",
        "latent_std_flipped",
        "caption",
    }
    config = _config("sd15", folder, photos)
    pre_config = _config("sd15", folder, photos, f"data.precomputed_latents_dir={sd15_latents}")
    model = finetune.load_model(config)
    objective = finetune.make_objective(config, model)
    images = caption_batches.make_batches(config, model)[1]
    latents = caption_batches.make_batches(pre_config, model)[1]
    assert "image" not in latents and "latent_mean_flipped" in latents
    for a, b in zip(images["input_ids"], latents["input_ids"], strict=True):
        np.testing.assert_array_equal(a, b)  # the same examples, the same captions
    n = len(latents["latent_mean"])
    draws = finetune.sample_draws(objective, jax.random.key(3), n)
    draws["flip"] = np.arange(n) % 2 == 0  # both orientations in one batch
    frozen = finetune.frozen_params(model)
    step = jax.jit(
        lambda b, d: finetune.loss_with_draws(objective, model.unet_params, frozen, b, d)
    )
    in_step, read = float(step(images, draws)[0]), float(step(latents, draws)[0])
    tolerance = 1e-5 * abs(in_step)
    assert abs(in_step - read) <= tolerance, (in_step, read)
    # Not vacuous: the other orientations' posteriors give another loss (by 8.5e-4 relative on
    # these random photos, where the diffusion noise dominates the loss).
    other = float(step(latents, {**draws, "flip": ~draws["flip"]})[0])
    assert abs(other - in_step) > 20 * tolerance, (other, in_step)


@pytest.mark.slow
def test_finetune_on_precomputed_latents_trains_as_in_step_encoding(
    tmp_path, sd15_run, checkpoints, photos, sd15_latents
):
    """Two steps of the CLI run on the latents: the losses of sd15_run's first two steps."""
    folder, _ = checkpoints["sd15"]
    workdir = tmp_path / "sd15_latents"
    args = _train_args(
        "sd15",
        workdir,
        folder,
        photos,
        f"--config.data.precomputed_latents_dir={sd15_latents}",
        "--config.num_train_steps=2",
        "--config.sample.prompts=()",
    )
    assert cli.main(args) == 0
    got, want = _metrics(workdir), _metrics(sd15_run[0])[:2]
    assert [r["step"] for r in got] == [1, 2]
    for a, b in zip(got, want):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"]), (a, b)
    assert load_pretrained(workdir / "export").kind == "sd1"


def test_precomputed_latents_that_do_not_fit_are_refused(
    tmp_path, checkpoints, photos, sd15_latents, capsys
):
    sdxl_folder, _ = checkpoints["sdxl"]
    sd15_folder, _ = checkpoints["sd15"]

    def batches(folder, latents, *extra):
        config = _config("sd15", folder, photos, f"data.precomputed_latents_dir={latents}", *extra)
        return caption_batches.make_batches(config, finetune.load_model(config))

    # (The tiny SDXL checkpoint has the tiny SD1.5 VAE: only the size columns are missing.)
    with pytest.raises(ValueError, match="no SDXL size conditioning"):
        batches(sdxl_folder, sd15_latents)
    with pytest.raises(ValueError, match="image_size 16, not 32"):
        batches(sd15_folder, sd15_latents, "data.image_size=32")
    # Latents written without mirror images do not serve a run that flips.
    unflipped = tmp_path / "unflipped"
    args = _encode_args("sd15", sd15_folder, photos, unflipped, "--config.data.random_flip=False")
    assert cli.main(args) == 0
    assert "latent_mean_flipped" not in json.loads((unflipped / "meta.json").read_text())["columns"]
    with pytest.raises(ValueError, match="no mirror images"):
        batches(sd15_folder, unflipped)
    assert "latent_mean" in batches(sd15_folder, unflipped, "data.random_flip=False")[0]
    meta = json.loads((unflipped / "meta.json").read_text())
    (unflipped / "meta.json").write_text(json.dumps({**meta, "vae_fingerprint": "0" * 16}))
    with pytest.raises(ValueError, match="another VAE"):
        batches(sd15_folder, unflipped, "data.random_flip=False")
    # The ldm stage's latents (token ids, its own VAE) are not the finetune stage's.
    (unflipped / "meta.json").write_text(json.dumps({**meta, "stage": "ldm"}))
    with pytest.raises(ValueError, match="written for the ldm stage"):
        batches(sd15_folder, unflipped, "data.random_flip=False")
    with pytest.raises(FileNotFoundError, match="ldm-jax encode --config"):
        batches(sd15_folder, tmp_path / "nothing")
    with pytest.raises(ValueError, match="cannot be precomputed"):
        batches(sd15_folder, sd15_latents, "data.random_crop=True")
    args = _encode_args(
        "sd15", sd15_folder, photos, tmp_path / "y", "--config.data.random_crop=True"
    )
    assert cli.main(args) == 2
    assert "no one latent per image" in capsys.readouterr().err
    # The CLI: --workdir does not apply, and an existing output is not overwritten.
    assert cli.main(_encode_args("sd15", sd15_folder, photos, sd15_latents)) == 2
    assert "already holds encoded latents" in capsys.readouterr().err
    args = _encode_args("sd15", sd15_folder, photos, tmp_path / "x", "--workdir", str(tmp_path))
    assert cli.main(args) == 2
    assert "drop --workdir" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")
    assert cli.main(_encode_args("sd15", sd15_folder, photos, tmp_path / "a_file")) == 2
    assert "is a file" in capsys.readouterr().err
    # What an interrupted encode left is neither reused nor removed.
    (tmp_path / "partial" / "tfds").mkdir(parents=True)
    assert cli.main(_encode_args("sd15", sd15_folder, photos, tmp_path / "partial")) == 2
    assert "holds no meta.json" in capsys.readouterr().err
    assert (tmp_path / "partial" / "tfds").is_dir()


# --- Random crops (`data.random_crop`). ---


def test_random_crops_are_a_function_of_seed_step_and_example():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape + (3,), dtype=np.uint8) for shape in PHOTOS[:4]]
    indices = np.array([5, 1, 7, 2])
    crops, corners, widths = caption_batches.random_crops(images, SIZE, 0, 3, indices)
    assert crops.shape == (4, SIZE, SIZE, 3) and corners.dtype == np.int32
    for image, crop, (top, left), width in zip(images, crops, corners, widths):
        h, w = image.shape[:2]
        assert 0 <= top <= h - SIZE and 0 <= left <= w - SIZE and width == w
        np.testing.assert_array_equal(crop, image[top : top + SIZE, left : left + SIZE])
    again = caption_batches.random_crops(images, SIZE, 0, 3, indices)
    np.testing.assert_array_equal(again[1], corners)  # the same (seed, step, example)
    # Example 2 alone (another process's share of the batch) gets the same crop.
    alone = caption_batches.random_crops(images[3:], SIZE, 0, 3, indices[3:])
    np.testing.assert_array_equal(alone[1][0], corners[3])
    later = [caption_batches.random_crops(images, SIZE, 0, s, indices)[1] for s in range(4, 12)]
    assert any(not np.array_equal(c, corners) for c in later)  # steps crop differently
    with pytest.raises(ValueError, match="no 16x16 crop"):
        caption_batches.random_crops([np.zeros((12, 30, 3), np.uint8)], SIZE, 0, 0, [0])


def test_sdxl_random_crop_batches_carry_each_crop_and_its_mirror(checkpoints, photos):
    folder, _ = checkpoints["sdxl"]
    config = _config("sdxl", folder, photos, "data.random_crop=True")
    model = finetune.load_model(config)
    from ldm_jax.data.image_caption import center_crop_box
    from ldm_jax.data.pipeline import load_dataset

    stored = load_dataset(config, "train", crop="none")  # resized, shorter side 16, uncropped
    for image, (h, w) in zip(stored["image"], PHOTOS):
        assert image.shape[:2] == center_crop_box(h, w, SIZE)[:2]
    batches = caption_batches.make_batches(config, model)
    step = 2
    batch, indices = batches[step], batches.examples.indices(step)
    assert batch["image"].shape == (len(PHOTOS), SIZE, SIZE, 3)
    for i, crop, (top, left), (mtop, mleft), size in zip(
        indices,
        batch["image"],
        batch["crop_top_left"],
        batch["crop_top_left_flipped"],
        batch["original_size"],
    ):
        full = stored["image"][int(i)]
        assert tuple(size) == PHOTOS[int(i)]
        np.testing.assert_array_equal(crop, full[top : top + SIZE, left : left + SIZE])
        # The mirrored crop sits at the mirrored corner of the mirrored image.
        assert mtop == top
        mirror = full[:, ::-1]
        np.testing.assert_array_equal(crop[:, ::-1], mirror[top : top + SIZE, mleft : mleft + SIZE])
    # The step's time ids use the mirrored corner for flipped examples, the crop's own corner
    # for the others (diffusers' compute_time_ids: original size, corner, target size).
    objective = finetune.make_objective(config, model)
    flip = np.arange(len(PHOTOS)) % 2 == 1
    time_ids = np.asarray(finetune.sdxl_time_ids(objective, batch, flip))
    corners = np.where(flip[:, None], batch["crop_top_left_flipped"], batch["crop_top_left"])
    want = np.concatenate([batch["original_size"], corners, np.full_like(corners, SIZE)], -1)
    np.testing.assert_array_equal(time_ids, want)
    moved = flip & np.any(batch["crop_top_left_flipped"] != batch["crop_top_left"], axis=-1)
    assert moved.any()
    # ... and they reach the U-Net: its added embedding (where diffusers adds them to the
    # timestep embedding) changes with the corner by far more than float32 round-off.
    same_corner = {**batch, "crop_top_left_flipped": batch["crop_top_left"]}
    unet = model.unet
    pooled_width = unet.projection_class_embeddings_input_dim - 6 * unet.addition_time_embed_dim
    added = []
    for b in (batch, same_corner):
        cond = {
            "text_embeds": jnp.ones((len(PHOTOS), pooled_width)),
            "time_ids": finetune.sdxl_time_ids(objective, b, flip),
        }
        _, state = model.unet.apply(
            model.unet_params,
            jnp.zeros((len(PHOTOS), SIZE // 2, SIZE // 2, 4)),
            jnp.zeros(len(PHOTOS)),
            jnp.zeros((len(PHOTOS), 77, model.unet.cross_attention_dim)),
            added_cond_kwargs=cond,
            capture_intermediates=lambda module, _: module.name == "add_embedding",
        )
        added.append(np.asarray(state["intermediates"]["add_embedding"]["__call__"][0]))
    change = np.abs(added[0] - added[1]).max(axis=-1)
    assert np.all(change[~moved] == 0)
    assert np.all(change[moved] > 1e-3 * np.abs(added[0][moved]).max()), change
