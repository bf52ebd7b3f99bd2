"""The pretrained-weights pipeline against diffusers' own pipelines (issue 3, "Parity with the
PyTorch originals": the whole-pipeline check) and `ldm-jax sample --pretrained`.

Tiny random diffusers pipelines are built in torch, saved with `save_pretrained`, loaded with
`ldm_jax.convert.load_pretrained`, and run on both sides with the same prompt, the same initial
latents and DDIM: the uint8 images must agree within one 8-bit level.
"""

import inspect
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import train_args
from ldm_jax import cli
from ldm_jax.model import load_pretrained, load_run
from ldm_jax.pipeline import generate

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import tiny_checkpoints as tiny  # noqa: E402 (needs torch, diffusers: after the skips above)

SIZE = tiny.SIZE
STEPS = 6
PROMPTS = ["a photo of an astronaut riding a horse", "a red circle"]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory, clip_tokenizer_dir):
    """(folder, diffusers pipeline) of a tiny random SD1-style text-to-image model."""
    pipe = tiny.sd_pipeline(clip_tokenizer_dir)
    path = tmp_path_factory.mktemp("tiny_sd")
    pipe.save_pretrained(path, safe_serialization=True)
    return path, pipe


@pytest.fixture(scope="module")
def sd(sd_folder):
    return load_pretrained(sd_folder[0])


def _latents(n, channels=4, seed=0):
    """Standard-normal initial latents, NCHW for diffusers and NHWC for us."""
    nchw = torch.randn(
        (n, channels, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(seed)
    )
    return nchw, nchw.numpy().transpose(0, 2, 3, 1)


def _diffusers_uint8(images: np.ndarray) -> np.ndarray:
    """output_type="np" floats in [0, 1] -> uint8 as diffusers' numpy_to_pil."""
    return (images * 255).round().astype(np.uint8)


def _assert_within_one_level(ours: np.ndarray, theirs: np.ndarray):
    assert ours.shape == theirs.shape and ours.dtype == np.uint8
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    assert diff.max() <= 1, f"max |diff| {diff.max()} 8-bit levels ({(diff > 1).mean():.2%} px)"
    # The comparison means something only if the images are not saturated flat colours.
    assert theirs.std() > 10 and 0.2 < np.mean((theirs > 5) & (theirs < 250))


def test_text_to_image_matches_diffusers(sd_folder, sd):
    _, pipe = sd_folder
    nchw, nhwc = _latents(4)
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE)
    with torch.no_grad():
        theirs = pipe(
            PROMPTS,
            negative_prompt=["blurry", ""],
            num_images_per_prompt=2,
            latents=nchw,
            output_type="np",
            **kwargs,
        ).images
    ours = generate(
        sd,
        PROMPTS,
        negative_prompt=["blurry", ""],
        num_images_per_prompt=2,
        latents=nhwc,
        sampler="ddim",
        **kwargs,
    )
    _assert_within_one_level(ours, _diffusers_uint8(theirs))


def test_guidance_at_most_one_is_the_conditional_model_as_in_diffusers(sd_folder, sd):
    _, pipe = sd_folder
    nchw, nhwc = _latents(1, seed=2)
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=0.5, height=SIZE, width=SIZE)
    with torch.no_grad():  # diffusers skips the unconditional pass when guidance_scale <= 1
        theirs = pipe(PROMPTS[1], latents=nchw, output_type="np", **kwargs).images
    ours = generate(sd, PROMPTS[1], negative_prompt="ignored", latents=nhwc, **kwargs)
    _assert_within_one_level(ours, _diffusers_uint8(theirs))


def test_guidance_rescale_and_clip_skip_match_diffusers(sd_folder, sd):
    _, pipe = sd_folder
    nchw, nhwc = _latents(1, seed=3)
    kwargs = dict(
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        guidance_rescale=0.7,
        clip_skip=1,
        height=SIZE,
        width=SIZE,
    )
    # diffusers 0.42's clip_skip reads `text_encoder.text_model.final_layer_norm`, a path that
    # transformers 5 removed (CLIPTextModel holds final_layer_norm itself): point it there.
    encoder = pipe.text_encoder
    encoder.text_model = types.SimpleNamespace(final_layer_norm=encoder.final_layer_norm)
    try:
        with torch.no_grad():
            theirs = pipe(PROMPTS[0], latents=nchw, output_type="np", **kwargs).images
            no_skip = pipe(
                PROMPTS[0], latents=nchw, output_type="np", **{**kwargs, "clip_skip": None}
            ).images
    finally:
        del encoder.text_model
    ours = generate(sd, PROMPTS[0], latents=nhwc, **kwargs)
    _assert_within_one_level(ours, _diffusers_uint8(theirs))
    # clip_skip changes the image, so the check above is not vacuous.
    assert np.abs(_diffusers_uint8(no_skip).astype(int) - ours).max() > 5


def test_seeds_are_per_image_and_compiled_once(sd):
    # The settings of test_text_to_image_matches_diffusers: the compiled function is reused.
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE)
    compiled = sd.cache.setdefault("compiled", {})
    before = set(compiled)
    a = generate(sd, PROMPTS, seed=[7, 8], **kwargs)
    b = generate(sd, ["a blue square"] + PROMPTS, seed=[1, 7, 8], **kwargs)
    np.testing.assert_array_equal(a, b[1:])  # an image depends on its prompt and seed only
    c = generate(sd, PROMPTS[0], seed=7, num_images_per_prompt=2, **kwargs)
    np.testing.assert_array_equal(c[0], a[0])  # seed=int: image i uses seed + i
    assert not np.array_equal(c[0], c[1])
    assert len(set(compiled) - before) <= 1  # one function for all these calls
    assert all(f._cache_size() == 1 for f in compiled.values())  # each compiled once


def test_bad_arguments_are_named(sd):
    kwargs = dict(num_inference_steps=2, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="multiples of 4"):
        generate(sd, "x", num_inference_steps=2, height=30, width=SIZE)
    with pytest.raises(ValueError, match="2 prompts but 3 negative prompts"):
        generate(sd, PROMPTS, negative_prompt=["a", "b", "c"], **kwargs)
    with pytest.raises(ValueError, match="latents must be"):
        generate(sd, "x", latents=np.zeros((1, 8, 8, 4), np.float32), **kwargs)
    with pytest.raises(ValueError, match="9-channel inpainting U-Net"):
        img = np.zeros((SIZE, SIZE, 3), np.uint8)
        generate(sd, "x", image=img, mask_image=img, **kwargs)
    with pytest.raises(ValueError, match="has no option"):
        generate(sd, "x", sampler="ddim", sampler_options={"etaa": 1.0}, **kwargs)


def test_inpainting_matches_diffusers(tmp_path, clip_tokenizer_dir):
    pipe = tiny.sd_pipeline(
        clip_tokenizer_dir,
        diffusers.StableDiffusionInpaintPipeline,
        in_channels=9,
        deterministic_vae=True,
    )
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    sd = load_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:24, 4:20] = 255  # white = repaint
    from PIL import Image

    nchw, nhwc = _latents(1, seed=5)
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE)
    with torch.no_grad():
        theirs = pipe(
            PROMPTS[0],
            image=Image.fromarray(image),
            mask_image=Image.fromarray(mask),
            latents=nchw,
            output_type="np",
            **kwargs,
        ).images
    ours = generate(sd, PROMPTS[0], image=image, mask_image=mask, latents=nhwc, **kwargs)
    _assert_within_one_level(ours, _diffusers_uint8(theirs))
    with pytest.raises(ValueError, match="inpainting model: give mask_image"):
        generate(sd, "x", num_inference_steps=2, height=SIZE, width=SIZE)


@pytest.mark.parametrize(
    "sampler,scheduler,strength",
    [
        ("ddim", "DDIMScheduler", 0.5),
        ("euler", "EulerDiscreteScheduler", 0.7),  # sigma space: add_noise is x0 + sigma z
        ("dpmpp_2m", "DPMSolverMultistepScheduler", 0.4),  # multistep warm-up from the start
    ],
)
def test_img2img_matches_diffusers(tmp_path, clip_tokenizer_dir, sampler, scheduler, strength):
    """StableDiffusionImg2ImgPipeline (get_timesteps truncation, add_noise at the first kept
    timestep) with the scheduler each sampler mirrors, from the checkpoint's scheduler config."""
    pipe = tiny.sd_pipeline(
        clip_tokenizer_dir, diffusers.StableDiffusionImg2ImgPipeline, deterministic_vae=True
    )
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    # As a user would: the saved folder's scheduler config, read by the other class.
    pipe.scheduler = getattr(diffusers, scheduler).from_pretrained(tmp_path, subfolder="scheduler")
    sd = load_pretrained(tmp_path)
    image = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    from PIL import Image

    kwargs = dict(num_inference_steps=STEPS, guidance_scale=7.5, strength=strength)
    with torch.no_grad():
        theirs = pipe(
            PROMPTS[0],
            image=Image.fromarray(image),
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **kwargs,
        ).images
    # diffusers draws the VAE posterior noise (negligible here) and then the initial noise from
    # the generator: replay both draws to get the same noise.
    g = torch.Generator().manual_seed(0)
    torch.randn((1, 4, SIZE // 2, SIZE // 2), generator=g)
    noise = torch.randn((1, 4, SIZE // 2, SIZE // 2), generator=g).numpy().transpose(0, 2, 3, 1)
    ours = generate(
        sd, PROMPTS[0], image=image, latents=noise, sampler=sampler, height=SIZE, width=SIZE,
        **kwargs,
    )  # fmt: skip
    _assert_within_one_level(ours, _diffusers_uint8(theirs))
    # Not the text-to-image result from the same noise: the init image is really used.
    txt2img = generate(sd, PROMPTS[0], latents=noise, sampler=sampler, height=SIZE, width=SIZE,
                       num_inference_steps=STEPS, guidance_scale=7.5)  # fmt: skip
    assert np.abs(ours.astype(int) - txt2img.astype(int)).mean() > 5


@pytest.mark.parametrize(
    "sampler,scheduler",
    [
        (None, "PNDMScheduler"),
        ("euler", "EulerDiscreteScheduler"),
        ("ddim", "DDIMScheduler"),
        ("dpm_solver_multistep", "DPMSolverMultistepScheduler"),
        ("lms", "LMSDiscreteScheduler"),
    ],
)
def test_sampler_for_a_checkpoint_reads_its_config_as_diffusers(tmp_path, sampler, scheduler):
    """`--sampler NAME` on a checkpoint = diffusers' `NAME.from_config(pipe.scheduler.config)`
    after `from_pretrained`: fields the file lacks take the new class's defaults (SD 1.5's file
    has no timestep_spacing, so Euler/LMS/DPM-Solver space "linspace" and DDIM "leading")."""
    from test_samplers_k import SD15 as SD15_SCHEDULER  # the released file, verbatim

    from ldm_jax.diffusion import samplers
    from ldm_jax.diffusion.samplers.options import resolve_sampler

    (tmp_path / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    loaded = diffusers.PNDMScheduler.from_pretrained(tmp_path)
    ref = getattr(diffusers, scheduler).from_config(loaded.config)
    name, options, schedule = resolve_sampler(SD15_SCHEDULER, sampler)
    assert name == (sampler or "plms")
    fn = samplers.get_sampler(name)
    defaults = {k: p.default for k, p in inspect.signature(fn).parameters.items()}
    effective = {**defaults, **options}
    assert effective["timestep_spacing"] == ref.config.timestep_spacing
    assert effective["steps_offset"] == ref.config.steps_offset
    # Same first timestep of a 10-step run as the diffusers scheduler.
    ref.set_timesteps(10)
    calls = []

    def model_fn(x, t):  # the loop is traced: record the timesteps through a host callback
        jax.debug.callback(lambda v: calls.append(float(v)), t[0])
        return 0 * x

    fn(model_fn, jnp.zeros((1, 1)), schedule, 10, **options)
    jax.effects_barrier()
    assert calls[0] == pytest.approx(float(ref.timesteps[0]), abs=1e-3)


@pytest.fixture(scope="module")
def sdxl_refiner(tmp_path_factory, clip_tokenizer_dir):
    pipe = tiny.sdxl_refiner_pipeline(clip_tokenizer_dir)
    path = tmp_path_factory.mktemp("tiny_sdxl_refiner")
    pipe.save_pretrained(path, safe_serialization=True)
    return pipe, load_pretrained(path)


def test_sdxl_refiner_conditioning_matches_diffusers(sdxl_refiner):
    """The refiner (text_encoder_2 only, aesthetic-score time ids) through diffusers'
    StableDiffusionXLImg2ImgPipeline, which starts from given `latents` as they are (the init
    image is then unused): the same start as our text-to-image with those latents."""
    pipe, sd = sdxl_refiner
    assert sd.kind == "sdxl-refiner" and not sd.force_zeros_for_empty_prompt
    nchw, nhwc = _latents(1, seed=6)
    kwargs = dict(
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        aesthetic_score=7.0,
        negative_aesthetic_score=2.0,
        original_size=(40, 56),
    )
    with torch.no_grad():
        theirs = pipe(
            PROMPTS[0],
            image=torch.zeros((1, 3, SIZE, SIZE)),
            strength=1.0,
            latents=nchw,
            output_type="np",
            **kwargs,
        ).images
    ours = generate(sd, PROMPTS[0], latents=nhwc, height=SIZE, width=SIZE, **kwargs)
    _assert_within_one_level(ours, _diffusers_uint8(theirs))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory, clip_tokenizer_dir):
    pipe = tiny.sdxl_pipeline(clip_tokenizer_dir)
    path = tmp_path_factory.mktemp("tiny_sdxl")
    pipe.save_pretrained(path, safe_serialization=True)
    return pipe, load_pretrained(path)


@pytest.mark.parametrize(
    "negative, second",
    [(None, {}), ("blurry", {}), ("blurry", dict(prompt_2="oil", negative_prompt_2="noisy"))],
)
def test_sdxl_text_to_image_matches_diffusers(sdxl, negative, second):
    # negative=None exercises force_zeros_for_empty_prompt (zero unconditional embeddings);
    # prompt_2 / negative_prompt_2 go to the second text encoder only.
    pipe, sd = sdxl
    assert sd.is_sdxl and sd.force_zeros_for_empty_prompt
    nchw, nhwc = _latents(1, seed=4)
    kwargs = dict(
        num_inference_steps=STEPS,
        guidance_scale=6.0,
        height=SIZE,
        width=SIZE,
        original_size=(64, 48),
        crops_coords_top_left=(4, 2),
        negative_prompt=negative,
        **second,
    )
    with torch.no_grad():
        theirs = pipe(PROMPTS[0], latents=nchw, output_type="np", **kwargs).images
    ours = generate(sd, PROMPTS[0], latents=nhwc, **kwargs)
    _assert_within_one_level(ours, _diffusers_uint8(theirs))


@pytest.mark.parametrize("split", [0.3, 0.7])
@pytest.mark.parametrize(
    "sampler, scheduler", [("euler", "EulerDiscreteScheduler"), ("heun", "HeunDiscreteScheduler")]
)
def test_sdxl_base_refiner_handoff_matches_diffusers(sdxl, sdxl_refiner, sampler, scheduler, split):
    """Issue 13, item 3: the base stops at `denoising_end` and returns latents; the refiner
    continues from them at `denoising_start` without re-noising, as diffusers'
    StableDiffusionXLPipeline and StableDiffusionXLImg2ImgPipeline split the timesteps (Heun's
    split may fall between its two stages; diffusers then restarts the refiner one step early)."""
    base_pipe, base = sdxl
    refiner_pipe, refiner = sdxl_refiner
    nchw, nhwc = _latents(1, seed=8)
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=5.0, height=SIZE, width=SIZE)
    ddim = base_pipe.scheduler, refiner_pipe.scheduler  # the module fixtures' schedulers
    try:
        for pipe in (base_pipe, refiner_pipe):
            # as `from_pretrained(<folder>, subfolder="scheduler")` reads the file we load
            pipe.scheduler = getattr(diffusers, scheduler).from_config(base.scheduler_config)
        with torch.no_grad():
            handed = base_pipe(
                PROMPTS[0], latents=nchw, denoising_end=split, output_type="latent", **kwargs
            ).images
            theirs = refiner_pipe(
                PROMPTS[0], image=handed, denoising_start=split, output_type="np", **kwargs
            ).images
    finally:
        base_pipe.scheduler, refiner_pipe.scheduler = ddim
    ours_handed = generate(
        base, PROMPTS[0], latents=nhwc, denoising_end=split, output_type="latent",
        sampler=sampler, **kwargs,
    )  # fmt: skip
    # The base's latents agree to float32 round-off of a few network evaluations.
    np.testing.assert_allclose(
        ours_handed, handed.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4
    )
    ours = generate(
        refiner, PROMPTS[0], image=ours_handed, denoising_start=split, sampler=sampler, **kwargs
    )
    _assert_within_one_level(ours, _diffusers_uint8(theirs))


def test_sample_cli_with_a_refiner(sdxl, sdxl_refiner, tmp_path, capsys):
    """`ldm-jax sample --pretrained BASE --refiner REFINER --denoising-end S`: the images of
    the two library calls (whose values the parity test above checks) and a manifest naming
    the refiner and the split."""
    from PIL import Image

    (_, base), (_, refiner) = sdxl, sdxl_refiner
    out = tmp_path / "out"
    args = ["sample", "--pretrained", base.source, "--prompt", PROMPTS[0], "--steps", str(STEPS)]
    args += ["--height", str(SIZE), "--width", str(SIZE), "--sampler", "euler", "--seed", "3"]
    assert (
        cli.main([*args, "--refiner", refiner.source, "--denoising-end", "0.7", "--out", str(out)])
        == 0
    )
    kwargs = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, sampler="euler", seed=3)
    latents = generate(base, PROMPTS[0], denoising_end=0.7, output_type="latent", **kwargs)
    images = generate(refiner, PROMPTS[0], image=latents, denoising_start=0.7, **kwargs)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "00000.png")), images[0])
    record = json.loads((out / "manifest.json").read_text())[0]
    assert record["refiner"] == refiner.source and record["denoising_end"] == 0.7
    assert cli.main([*args, "--denoising-end", "0.7", "--out", str(tmp_path / "x")]) == 2
    assert "--refiner and --denoising-end go together" in capsys.readouterr().err


def test_handoff_refuses_what_it_cannot_do(sdxl, sdxl_refiner):
    _, base = sdxl
    kwargs = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="sampler 'dpmpp_2m' has none yet"):
        generate(base, "x", denoising_end=0.5, sampler="dpmpp_2m", **kwargs)
    with pytest.raises(ValueError, match=r"denoising_end must be in \(0, 1\)"):
        generate(base, "x", denoising_end=1.0, sampler="euler", **kwargs)
    with pytest.raises(ValueError, match="denoising_start needs image"):
        generate(base, "x", denoising_start=0.5, sampler="euler", **kwargs)
    _, refiner = sdxl_refiner
    wrong = np.zeros((1, 4, 4, 4), np.float32)  # latents of another size
    with pytest.raises(ValueError, match=r"continues from latents \[N, 16, 16, 4\]"):
        generate(refiner, "x", image=wrong, denoising_start=0.5, sampler="euler", **kwargs)
    with pytest.raises(ValueError, match="leaves no steps"):
        generate(base, "x", denoising_end=0.01, sampler="euler", **kwargs)
    with pytest.raises(ValueError, match="output_type"):
        generate(base, "x", output_type="pil", **kwargs)


def test_sample_cli_pretrained_writes_outputs(sd_folder, tmp_path, capsys):
    folder, _ = sd_folder
    out = tmp_path / "out"
    args = ["sample", "--pretrained", str(folder), "--prompt", PROMPTS[0], "--prompt", "x"]
    args += ["--negative-prompt", "blurry", "--num-images", "2", "--steps", "3"]
    args += ["--height", str(SIZE), "--width", str(SIZE), "--seed", "3", "--sampler", "ddim"]
    args += ["--guidance-rescale", "0.5", "--sampler-option", "eta=0.0", "--out", str(out)]
    assert cli.main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [m["seed"] for m in manifest] == [3, 4, 5, 6]
    assert [m["prompt"] for m in manifest] == [PROMPTS[0]] * 2 + ["x"] * 2
    assert manifest[0]["guidance_scale"] == 7.5 and manifest[0]["guidance_rescale"] == 0.5
    assert manifest[0]["sampler_options"] == {"eta": 0.0}
    for record in manifest:
        assert (out / record["file"]).exists()
    assert (out / "grid.png").exists()
    captured = capsys.readouterr()
    assert "wrote 4 images" in captured.out
    assert "denoising" in captured.err and "3/3" in captured.err  # progress over 3 evaluations


def test_sample_cli_pretrained_img2img(sd_folder, sd, tmp_path, capsys):
    """`--init-image --strength` with the checkpoint's own sampler (DDIM here): the steps run are
    those the strength keeps, and the PNG is `generate`'s img2img image (whose values
    test_img2img_matches_diffusers checks), not the text-to-image one of the same seed."""
    from PIL import Image

    folder, _ = sd_folder
    picture = np.random.default_rng(2).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    path = tmp_path / "init.png"
    Image.fromarray(picture).save(path)
    out = tmp_path / "out"
    args = ["sample", "--pretrained", str(folder), "--prompt", PROMPTS[1], "--steps", "5"]
    args += ["--init-image", str(path), "--strength", "0.6", "--seed", "1", "--out", str(out)]
    args += ["--height", str(SIZE), "--width", str(SIZE)]
    assert cli.main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest[0]["strength"] == 0.6 and manifest[0]["init_image"] == str(path)
    assert "3/3" in capsys.readouterr().err  # int(5 * 0.6) = 3 of the 5 steps run
    written = np.asarray(Image.open(out / manifest[0]["file"]))
    kwargs = dict(num_inference_steps=5, guidance_scale=7.5, seed=1, height=SIZE, width=SIZE)
    img2img = generate(sd, PROMPTS[1], image=picture, strength=0.6, **kwargs)[0]
    np.testing.assert_array_equal(written, img2img)
    txt2img = generate(sd, PROMPTS[1], **kwargs)[0]
    assert np.abs(written.astype(int) - txt2img.astype(int)).mean() > 5


def test_sample_cli_pretrained_bad_input(sd_folder, tmp_path, capsys):
    folder, _ = sd_folder
    base = ["sample", "--prompt", "x", "--out", str(tmp_path / "o")]
    assert cli.main(base + ["--pretrained", str(folder), "--workdir", str(tmp_path)]) == 2
    assert "exactly one of --workdir" in capsys.readouterr().err
    assert cli.main(base + ["--pretrained", str(folder), "--mask", "m.png"]) == 2
    assert "--mask needs --init-image" in capsys.readouterr().err
    assert cli.main(base + ["--pretrained", str(folder), "--init-image", "nope.png"]) == 2
    assert "--init-image nope.png: no such file" in capsys.readouterr().err
    assert cli.main(base + ["--pretrained", str(folder), "--sampler-option", "eta"]) == 2
    assert "--sampler-option takes KEY=VALUE" in capsys.readouterr().err
    args = ["--pretrained", str(folder), "--sampler", "ddim", "--sampler-option", "etaa=1"]
    assert cli.main(base + args) == 2
    assert "sampler 'ddim' has no option(s) ['etaa']" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_sample_cli_single_file_needs_and_uses_tokenizer(
    sd_folder, tmp_path, clip_tokenizer_dir, capsys
):
    """The same tiny weights as an original-layout single file (`save_single_file`) give the
    same images as the diffusers folder; without --tokenizer the error says what to pass."""
    from ldm_jax.convert import original

    folder, pipe = sd_folder
    state_dicts = {
        "unet": pipe.unet.state_dict(),
        "vae": pipe.vae.state_dict(),
        "text_encoder": {
            ("" if k.startswith("text_model.") else "text_model.") + k: v
            for k, v in pipe.text_encoder.state_dict().items()
        },
    }
    state_dicts = {
        c: {k: v.detach().numpy() for k, v in sd.items()} for c, sd in state_dicts.items()
    }
    path = tmp_path / "tiny_sd1.safetensors"
    original.save_single_file(path, "sd1", state_dicts)
    args = ["sample", "--pretrained", str(path), "--prompt", PROMPTS[0], "--num-images", "1"]
    args += ["--steps", "3", "--height", str(SIZE), "--width", str(SIZE), "--sampler", "ddim"]
    assert cli.main(args + ["--out", str(tmp_path / "no_tok")]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    out = tmp_path / "out"
    assert cli.main(args + ["--tokenizer", str(clip_tokenizer_dir), "--out", str(out)]) == 0
    from PIL import Image

    single = np.asarray(Image.open(out / "00000.png"))
    folder_out = tmp_path / "folder"
    assert cli.main(args[:2] + [str(folder)] + args[3:] + ["--out", str(folder_out)]) == 0
    np.testing.assert_array_equal(single, np.asarray(Image.open(folder_out / "00000.png")))


@pytest.mark.slow
def test_distill_a_pretrained_checkpoint(clip_tokenizer_dir, data_dir, tmp_path):
    """Issue 13: progressive distillation takes a pretrained checkpoint as its teacher (the same
    `Model` a run trained here loads into): one smoke round on the shapes data; the student is
    then sampled like a run (`load_run`, `sample --workdir`), with the checkpoint's modules."""

    one_level = dict(
        block_out_channels=(32,),
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
    )  # half the compile time of two levels
    folder = tmp_path / "teacher"
    tiny.sd_pipeline(clip_tokenizer_dir, **one_level).save_pretrained(folder)
    workdir = tmp_path / "student"
    teacher = f"--config.distill.teacher_workdir={folder}"
    assert cli.main(train_args("distill,smoke", workdir, data_dir, teacher)) == 0
    student, checkpoint = load_run(workdir), load_pretrained(folder)
    assert student.kind == checkpoint.kind == "sd1" and student.source == str(workdir)
    assert student.sampling["num_inference_steps"] == student.config.distill.student_steps
    same = lambda a, b: all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
    assert same(student.vae_params, checkpoint.vae_params)  # the teacher's VAE, frozen
    assert np.float32(student.scaling_factor) == np.float32(checkpoint.scaling_factor)
    assert not same(student.unet_params, checkpoint.unet_params)  # the student trained
    out = tmp_path / "samples"
    command = ["sample", "--workdir", str(workdir), "--prompt", "a red circle", "--out", str(out)]
    assert cli.main(command) == 0
    record = json.loads((out / "manifest.json").read_text())[0]
    assert (record["steps"], record["guidance_scale"]) == (2, 1.0)  # the student's own
