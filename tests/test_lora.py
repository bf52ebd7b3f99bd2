"""LoRA (ldm_jax/models/adapters/lora.py, ldm_jax/convert/lora.py) against peft and diffusers:
adapters built with peft on a tiny random diffusers U-Net (`init_lora_weights=False`, so B is
not zero and the test proves something), over attention, feed-forward, projection and conv
layers, two at once with weights; unfused (method interception) and fused; read from the file
diffusers' `save_lora_weights` writes, alpha from its metadata."""

import copy
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from test_models import HOOKS_UNET

from ldm_jax.convert.diffusers import convert_state_dict
from ldm_jax.convert.lora import (
    adapters_to_peft_state_dict,
    kohya_state_dict_to_adapters,
    peft_state_dict_to_adapters,
    read_lora,
)
from ldm_jax.convert.state_dict import CheckpointError
from ldm_jax.models.adapters import lora
from ldm_jax.models.unet import UNet2DConditionModel

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

FIELDS = HOOKS_UNET  # the conditioning-hook tests' tiny U-Net: two levels, 4 transformers
# Attention (diffusers' default), feed-forward, projections and the resnets' convolutions
# (a conv LoRA: A a 3x3 conv, B 1x1).
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "proj_in", "conv1", "conv2"]


@pytest.fixture(scope="module")
def unet_pair():
    import diffusers

    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(sample_size=8, **FIELDS).eval()
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in FIELDS.items()}
    model = UNet2DConditionModel(**cfg)
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    params = convert_state_dict("unet", model, state)
    rng = np.random.default_rng(0)
    inputs = (
        rng.normal(size=(2, 8, 8, 4)).astype(np.float32),
        np.array([3.0, 750.0], np.float32),
        rng.normal(size=(2, 5, 48)).astype(np.float32),
    )
    return ref, model, params, inputs


def _reference(ref, inputs):
    x, t, ctx = inputs
    with torch.no_grad():
        out = ref(
            torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
            torch.from_numpy(t),
            torch.from_numpy(ctx),
        )
    return out.sample.numpy().transpose(0, 2, 3, 1)


def _unet_inputs(cross_attention_dim: int = 32, seed: int = 1):
    """(latents NHWC, timesteps, context) for a tiny U-Net's forward pass."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    ctx = rng.normal(size=(2, 77, cross_attention_dim)).astype(np.float32)
    return x, np.array([10.0, 700.0], np.float32), ctx


def _peft_unet_layers(unet, config, seed: int, name: str = "x"):
    """PEFT's state dict of an adapter `config` (seeded) on a diffusers U-Net, which is left
    without it."""
    from peft import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet.add_adapter(config, adapter_name=name)
    layers = get_peft_model_state_dict(unet, adapter_name=name)
    unet.delete_adapters([name])
    return layers


def _add(ref, name, rank, alpha, targets):
    from peft import LoraConfig, get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(rank)
    ref.add_adapter(config, adapter_name=name)
    state = get_peft_model_state_dict(ref, adapter_name=name)
    return config, {f"unet.{k}": v.detach().numpy() for k, v in state.items()}


def test_two_peft_adapters_with_weights_unfused_and_fused(unet_pair):
    ref, model, params, inputs = unet_pair
    base = _reference(ref, inputs)
    _, sd_a = _add(ref, "a", 4, 8, TARGETS)
    _, sd_b = _add(ref, "b", 2, 2, ["to_k", "conv2"])
    try:
        ref.set_adapters(["a", "b"], weights=[0.7, 0.3])
        want = _reference(ref, inputs)
    finally:
        ref.delete_adapters(["a", "b"])
    a = lora.Adapter(peft_state_dict_to_adapters(sd_a)["unet"], alpha=8, weight=0.7)
    b = lora.Adapter(peft_state_dict_to_adapters(sd_b)["unet"], alpha=2, weight=0.3)
    flat = traverse_util.flatten_dict(a.params["params"])
    assert any(v.ndim == 4 for p, v in flat.items() if p[-1] == "lora_A")  # conv LoRAs too

    @jax.jit
    def unfused(params, a_params, b_params, x, t, ctx):
        adapters = [
            lora.Adapter(a_params, 8, 0.7),
            lora.Adapter(b_params, 2, 0.3),
        ]
        with lora.intercept(adapters):
            return model.apply(params, x, t, ctx)

    got = unfused(params, a.params, b.params, *inputs)
    np.testing.assert_allclose(got, want, atol=3e-5, rtol=1e-4)
    fused = jax.jit(model.apply)(lora.fuse(params, [a, b]), *inputs)
    np.testing.assert_allclose(fused, got, atol=1e-5, rtol=0)
    assert np.abs(want - base).max() > 1e-2  # the adapters matter
    # The base tree is untouched by fuse ("unfuse" = the base): it still gives the base output.
    np.testing.assert_allclose(jax.jit(model.apply)(params, *inputs), base, atol=2e-5, rtol=1e-4)


def test_a_diffusers_lora_file_loads_with_its_alpha(unet_pair, tmp_path):
    """`save_lora_weights` with the adapter metadata (alpha != rank); read back here and run at
    weight 0.5 (diffusers' `lora_scale`), equal to diffusers' `set_adapters` weight 0.5."""
    import diffusers

    ref, model, params, inputs = unet_pair
    config, state = _add(ref, "c", 4, 2, TARGETS)
    try:
        ref.set_adapters(["c"], weights=[0.5])
        want = _reference(ref, inputs)
    finally:
        ref.delete_adapters(["c"])
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers={k[len("unet.") :]: torch.from_numpy(v) for k, v in state.items()},
        unet_lora_adapter_metadata=config.to_dict(),
    )
    adapter = read_lora(tmp_path / "pytorch_lora_weights.safetensors", weight=0.5)["unet"]
    assert adapter.alpha == 2.0
    got = jax.jit(model.apply)(lora.fuse(params, [adapter]), *inputs)
    np.testing.assert_allclose(got, want, atol=3e-5, rtol=1e-4)
    # ... and writes the same state dict back.
    again = adapters_to_peft_state_dict({"unet": adapter})
    assert sorted(again) == sorted(state)
    for key, value in state.items():
        np.testing.assert_array_equal(again[key], value)


def test_init_starts_at_the_base_model_and_checks_targets(unet_pair):
    _, model, params, inputs = unet_pair
    fresh = lora.init(params, lora.ATTENTION_TARGETS, 4, jax.random.key(0))
    layers = lora.targeted_layers(params, lora.ATTENTION_TARGETS)
    assert len(layers) == 4 * 2 * 4  # 4 transformers (down 1, mid 1, up 2) x 2 attentions x 4
    kernels = traverse_util.flatten_dict(params["params"])
    shapes = [kernels[(*layer, "kernel")].shape for layer in layers]
    assert lora.num_params(fresh) == sum(4 * (fan_in + fan_out) for fan_in, fan_out in shapes)
    with lora.intercept([lora.Adapter(fresh, 4.0)]):
        out = model.apply(params, *inputs)
    np.testing.assert_array_equal(out, model.apply(params, *inputs))  # B = 0
    bad = jax.tree.map(lambda x: x, fresh)
    bad["params"]["no_such_layer"] = {"lora_A": jnp.zeros((2, 4)), "lora_B": jnp.zeros((4, 2))}
    with pytest.raises(ValueError, match=r"1 layers not in the model: \['no_such_layer'\]"):
        lora.fuse(params, [lora.Adapter(bad)])
    with pytest.raises(ValueError, match="no Dense or Conv layer matches"):
        lora.init(params, ["nope"], 4, jax.random.key(0))


def test_bad_lora_files_are_named():
    a = np.zeros((4, 32), np.float32)
    with pytest.raises(CheckpointError, match="DoRA"):
        peft_state_dict_to_adapters({"unet.x.to_q.lora_magnitude_vector": a})
    with pytest.raises(CheckpointError, match="LoHa"):
        kohya_state_dict_to_adapters({"lora_unet_x_to_q.hada_w1_a": a}, {"unet": []})
    with pytest.raises(CheckpointError, match="an alpha is one number, not shape"):
        kohya_state_dict_to_adapters({"lora_unet_conv_in.alpha": a}, {"unet": [("conv_in",)]})
    with pytest.raises(CheckpointError, match="1 kohya LoRA keys match no layer"):
        kohya_state_dict_to_adapters({"lora_unet_nope.lora_down.weight": a}, {"unet": []})
    with pytest.raises(CheckpointError, match="1 keys are not diffusers / PEFT LoRA weights"):
        peft_state_dict_to_adapters({"vae.decoder.conv_in.lora_A.weight": a})
    with pytest.raises(CheckpointError, match="without both A and B"):
        peft_state_dict_to_adapters({"unet.mid_block.attentions.0.proj_in.lora_A.weight": a})


@pytest.mark.slow
def test_lora_training_end_to_end_loads_in_diffusers(tmp_path, clip_tokenizer_dir):
    """`ldm-jax train --config configs/sd15_lora.py:smoke` on a tiny random SD checkpoint, with
    a text-encoder LoRA: only the adapters train and are checkpointed (the base's fingerprint
    beside them), a resume continues, and the file written at the end loads in diffusers'
    `load_lora_weights` with the U-Net and text-encoder outputs ours give."""
    import tiny_checkpoints as tiny
    from PIL import Image

    from conftest import REPO
    from ldm_jax import cli
    from ldm_jax.model import load_pretrained
    from ldm_jax.runs import Checkpointer

    pipe = tiny.sd_pipeline(
        clip_tokenizer_dir,
        block_out_channels=(32,),
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
    )
    folder, photos, workdir = tmp_path / "sd15", tmp_path / "photos", tmp_path / "run"
    pipe.save_pretrained(folder, safe_serialization=True)
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(photos / f"{i}.png")
        (photos / f"{i}.txt").write_text(f"a red circle, photo {i}")
    args = [
        "train", "--config", str(REPO / "configs" / "sd15_lora.py") + ":smoke",
        "--workdir", str(workdir), f"--config.pretrained={folder}",
        f"--config.data.path={photos}", f"--config.data.data_dir={tmp_path / 'tfds'}",
        "--config.sample.prompts=()", "--config.lora.targets=('to_q','to_v','conv1')",
        "--config.lora.text_encoder_targets=('q_proj','out_proj','fc1')",
        "--config.param_groups.text_encoder_lora.learning_rate=0.01",
    ]  # fmt: skip
    assert cli.main([*args, "--config.num_train_steps=2"]) == 0
    assert cli.main([*args, "--config.num_train_steps=3"]) == 0  # resumes from step 2
    checkpointer = Checkpointer(workdir, read_only=True)
    saved = checkpointer.restore_raw(3)
    assert set(saved["params"]) == {"lora", "text_encoder_lora"} and not saved.get("frozen")
    assert "frozen_fingerprint" in checkpointer.read_meta(3)
    for tree in (saved["params"]["lora"], saved["params"]["text_encoder_lora"]["text_encoder"]):
        flat = traverse_util.flatten_dict(tree)
        assert all(p[-1] in ("lora_A", "lora_B") for p in flat)
        assert any(np.abs(v).max() > 0 for p, v in flat.items() if p[-1] == "lora_B")  # trained

    adapters = read_lora(workdir / "pytorch_lora_weights.safetensors")
    adapter = adapters["unet"]
    ours = load_pretrained(folder)
    pipe.load_lora_weights(workdir)
    ids = np.array([[49406, 320, 736, 2760, 49407] + [49407] * 72], np.int32)
    with torch.no_grad():
        want = pipe.text_encoder(torch.from_numpy(ids).long())[0].numpy()
    encoder = ours.text_encoders[0]
    fused = lora.fuse(ours.text_encoder_params[0], [adapters["text_encoder"]])
    base = encoder.apply(ours.text_encoder_params[0], ids).last_hidden_state
    assert not np.allclose(base, want, atol=1e-4)  # the text-encoder LoRA changes something
    got = encoder.apply(fused, ids).last_hidden_state
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    inputs = _unet_inputs()
    want = _reference(pipe.unet, inputs)
    got = jax.jit(ours.unet.apply)(lora.fuse(ours.unet_params, [adapter]), *inputs)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_generate_and_sample_cli_with_lora_files_match_diffusers(
    tmp_path, clip_tokenizer_dir, capsys
):
    """Two LoRA files (written by diffusers' `save_lora_weights`, alpha != rank in one) fused at
    weights 0.7 and 0.3: `generate(..., lora=...)` against diffusers' pipeline after
    `load_lora_weights` and `set_adapters`, the same prompt and latents, images within one 8-bit
    level, with a third file, a text-encoder LoRA; `ldm-jax sample --lora FILE:WEIGHT` writes them and records the files; a LoRA of
    another base is refused by name."""
    import diffusers
    import tiny_checkpoints as tiny
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from test_generate import _assert_within_one_level, _diffusers_uint8, _latents

    from ldm_jax import cli
    from ldm_jax.model import load_pretrained
    from ldm_jax.pipeline import generate

    pipe = tiny.sd_pipeline(clip_tokenizer_dir)
    folder = tmp_path / "sd"
    pipe.save_pretrained(folder, safe_serialization=True)
    files = []
    for name, rank, alpha, targets in (("a", 4, 8, TARGETS), ("b", 2, 2, ["to_k", "to_v"])):
        config = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False
        )
        layers = _peft_unet_layers(pipe.unet, config, seed=rank, name=name)
        diffusers.StableDiffusionPipeline.save_lora_weights(
            tmp_path / name, unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict()
        )
        files.append(tmp_path / name / "pytorch_lora_weights.safetensors")
        pipe.load_lora_weights(tmp_path / name, adapter_name=name)
    # A text-encoder LoRA (peft's inject_adapter_in_model on a copy: transformers 5's
    # add_adapter wants a newer peft), written and loaded the same way.
    encoder = copy.deepcopy(pipe.text_encoder)
    config = LoraConfig(
        r=4, lora_alpha=2, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1"],
    )  # fmt: skip
    torch.manual_seed(5)
    inject_adapter_in_model(config, encoder, adapter_name="t")
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path / "t",
        text_encoder_lora_layers=get_peft_model_state_dict(encoder, adapter_name="t"),
        text_encoder_lora_adapter_metadata=config.to_dict(),
    )
    files.append(tmp_path / "t" / "pytorch_lora_weights.safetensors")
    pipe.load_lora_weights(tmp_path / "t", adapter_name="t")
    pipe.set_adapters(["a", "b", "t"], adapter_weights=[0.7, 0.3, 1.0])
    nchw, nhwc = _latents(2)
    kwargs = dict(num_inference_steps=4, guidance_scale=5.0, height=tiny.SIZE, width=tiny.SIZE)
    prompts = ["a photo of an astronaut riding a horse", "a red circle"]
    with torch.no_grad():
        theirs = pipe(prompts, latents=nchw, output_type="np", **kwargs).images
    sd = load_pretrained(folder)
    loras = [(files[0], 0.7), (files[1], 0.3), files[2]]
    ours = generate(sd, prompts, latents=nhwc, sampler="ddim", lora=loras, **kwargs)
    _assert_within_one_level(ours, _diffusers_uint8(theirs))
    plain = generate(sd, prompts, latents=nhwc, sampler="ddim", **kwargs)
    assert np.abs(plain.astype(int) - ours).max() > 10  # the LoRAs change the images
    unet_only = generate(sd, prompts, latents=nhwc, sampler="ddim", lora=loras[:2], **kwargs)
    assert np.abs(unet_only.astype(int) - ours).max() > 10  # ... the text-encoder one too

    # The first U-Net LoRA in kohya's layout (diffusers' convert_state_dict_to_kohya), its
    # alphas then halved (alpha != rank), against diffusers' own kohya loader.
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    peft_layers = {k: v for k, v in load_file(files[0]).items()}
    kohya = convert_state_dict_to_kohya(peft_layers)
    kohya = {k: v / 2 if k.endswith(".alpha") else v for k, v in kohya.items()}
    assert any(k.startswith("lora_unet_") for k in kohya)
    save_file({k: v.contiguous() for k, v in kohya.items()}, tmp_path / "kohya.safetensors")
    pipe.unload_lora_weights()
    pipe.load_lora_weights(tmp_path, weight_name="kohya.safetensors", adapter_name="k")
    with torch.no_grad():
        theirs = pipe(prompts, latents=nchw, output_type="np", **kwargs).images
    ours = generate(
        sd, prompts, latents=nhwc, sampler="ddim", lora=[tmp_path / "kohya.safetensors"], **kwargs
    )
    _assert_within_one_level(ours, _diffusers_uint8(theirs))

    out = tmp_path / "samples"
    args = ["sample", "--pretrained", str(folder), "--prompt", prompts[1], "--num-images", "1"]
    args += [
        "--steps",
        "2",
        "--out",
        str(out),
        "--lora",
        f"{files[0]}:0.7",
        "--lora",
        str(files[1]),
    ]
    assert cli.main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest[0]["lora"] == [
        {"file": str(files[0]), "weight": 0.7},
        {"file": str(files[1]), "weight": 1.0},
    ]
    capsys.readouterr()
    assert (
        cli.main([*args[:-4], "--out", str(tmp_path / "x"), "--lora", "missing.safetensors"]) == 2
    )
    assert "no such --lora file: missing.safetensors" in capsys.readouterr().err
    small = tiny.sd_pipeline(clip_tokenizer_dir, block_out_channels=(32,),
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))  # fmt: skip
    small.save_pretrained(tmp_path / "other", safe_serialization=True)
    with pytest.raises(ValueError, match="does not fit this sd1 unet"):
        generate(load_pretrained(tmp_path / "other"), "x", lora=[files[0]], num_inference_steps=1)


def test_sdxl_lora_file_with_both_text_encoders_matches_diffusers(tmp_path, clip_tokenizer_dir):
    """One SDXL LoRA file with U-Net, text_encoder and text_encoder_2 weights (written by
    `StableDiffusionXLPipeline.save_lora_weights`), images within one 8-bit level of diffusers'
    after `load_lora_weights`, micro-conditioning and the second encoder's projection included."""
    import diffusers
    import tiny_checkpoints as tiny
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from test_generate import _assert_within_one_level, _diffusers_uint8, _latents

    from ldm_jax.model import load_pretrained
    from ldm_jax.pipeline import generate

    pipe = tiny.sdxl_pipeline(clip_tokenizer_dir)
    pipe.save_pretrained(tmp_path / "sdxl", safe_serialization=True)
    layers = {}
    for i, name in enumerate(("unet", "text_encoder", "text_encoder_2")):
        # (out_proj: diffusers' kohya reader tells its text-encoder spellings apart by it)
        targets = TARGETS if name == "unet" else ["q_proj", "v_proj", "out_proj", "fc2"]
        config = LoraConfig(r=4, lora_alpha=2 + i, target_modules=targets, init_lora_weights=False)
        module = copy.deepcopy(getattr(pipe, name))
        torch.manual_seed(i)
        inject_adapter_in_model(config, module, adapter_name="x")
        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(module, adapter_name="x")
        layers[f"{name}_lora_adapter_metadata"] = config.to_dict()
    diffusers.StableDiffusionXLPipeline.save_lora_weights(tmp_path / "lora", **layers)
    pipe.load_lora_weights(tmp_path / "lora", adapter_name="x")
    nchw, nhwc = _latents(1, seed=4)
    kwargs = dict(num_inference_steps=4, guidance_scale=6.0, height=tiny.SIZE, width=tiny.SIZE)
    with torch.no_grad():
        theirs = pipe("a red circle", latents=nchw, output_type="np", **kwargs).images
    sd = load_pretrained(tmp_path / "sdxl")
    file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    assert set(read_lora(file)) == {"unet", "text_encoder", "text_encoder_2"}
    ours = generate(sd, "a red circle", latents=nhwc, lora=[file], sampler="euler", **kwargs)
    _assert_within_one_level(ours, _diffusers_uint8(theirs))
    plain = generate(sd, "a red circle", latents=nhwc, sampler="euler", **kwargs)
    assert np.abs(plain.astype(int) - ours).max() > 10  # the LoRA matters

    # The same LoRA as a kohya file with the original sgm block names (input_blocks_4_1_...,
    # middle_block_..., output_blocks_...), as many SDXL LoRAs are shared: diffusers reads the
    # names its own way (_maybe_map_sgm_blocks_to_diffusers) and gives the same images, so the
    # names are right; ours read them back too.
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    from ldm_jax.convert.lora import sgm_names

    to_sgm = {"_".join(p): n for n, p in sgm_names(lora.layer_paths(sd.unet_params)).items()}
    kohya = {}
    for key, value in convert_state_dict_to_kohya(load_file(file)).items():
        prefix, module, rest = re.match(r"(lora_unet_|lora_te\d_)(.+?)(\..*)$", key).groups()
        if prefix == "lora_unet_":
            module = to_sgm[module]
        if rest == ".alpha":  # the alphas of the metadata (lora_alpha = 2 + i above)
            value = torch.tensor({"lora_unet_": 2.0, "lora_te1_": 3.0, "lora_te2_": 4.0}[prefix])
        kohya[prefix + module + rest] = value.contiguous()
    assert any(k.startswith("lora_unet_output_blocks_") for k in kohya)
    save_file(kohya, tmp_path / "sgm.safetensors")
    pipe.unload_lora_weights()
    pipe.load_lora_weights(tmp_path, weight_name="sgm.safetensors", adapter_name="sgm")
    with torch.no_grad():
        again = pipe("a red circle", latents=nchw, output_type="np", **kwargs).images
    _assert_within_one_level(_diffusers_uint8(again), _diffusers_uint8(theirs))
    sgm = generate(
        sd, "a red circle", latents=nhwc, lora=[tmp_path / "sgm.safetensors"], sampler="euler",
        **kwargs,
    )  # fmt: skip
    _assert_within_one_level(sgm, _diffusers_uint8(theirs))


def test_alpha_pattern_from_the_metadata_is_per_layer():
    """PEFT's `alpha_pattern` (module-name patterns, matched as PEFT does: the name ends with
    the pattern after a dot) beside `lora_alpha`, as diffusers writes them per component."""
    import json as json_lib

    from ldm_jax.convert.lora import _alphas, _peft_config

    a, b = np.zeros((32, 4), np.float32), np.zeros((4, 32), np.float32)
    tree = {"params": {"mid_block": {"attentions_0": {"transformer_blocks_0": {"attn1": {
        "to_k": {"lora_A": a, "lora_B": b}, "to_q": {"lora_A": a, "lora_B": b},
    }}}}}}  # fmt: skip
    metadata = {"unet.lora_alpha": 4, "unet.alpha_pattern": {"attn1.to_k": 8}, "unet.r": 4}
    config = _peft_config({"lora_adapter_metadata": json_lib.dumps(metadata)}, "unet")
    layer = ("mid_block", "attentions_0", "transformer_blocks_0", "attn1")
    assert _alphas(config, tree) == {(*layer, "to_k"): 8.0, (*layer, "to_q"): 4.0}
    assert _alphas(None, tree) is None  # no metadata: alpha = rank


def test_shapes_lora_and_finetune_of_a_trained_run_on_a_held_out_concept(
    trained, data_dir, tmp_path, capsys
):
    """configs/shapes.py:lora,cross (U-Net and text-encoder LoRA) and finetune,cross adapt the
    session's smoke ldm run to the held-out shape; `eval adherence` then scores the cross
    prompts of the base with the LoRA file, and of the fine-tuned run."""
    from conftest import train_args
    from ldm_jax import cli
    from ldm_jax.model import load_run, with_lora

    _, base = trained
    lora_dir, full_dir = tmp_path / "lora", tmp_path / "finetune"
    extra = [f"--config.pretrained={base}", "--config.lora.text_encoder_targets=('q_proj',)"]
    assert cli.main(train_args("lora,cross,smoke", lora_dir, data_dir, *extra)) == 0
    assert (lora_dir / "samples" / "step_000003.png").is_file()
    file = lora_dir / "pytorch_lora_weights.safetensors"
    adapters = read_lora(file)
    assert set(adapters) == {"unet", "text_encoder"}
    model = load_run(base)
    adapted = with_lora(model, [(file, 0.5)])
    changed = jax.tree.map(
        lambda a, b: bool(np.any(a != b)), adapted.unet_params, model.unet_params
    )
    assert any(jax.tree.leaves(changed))

    out = tmp_path / "eval"
    args = ["eval", "adherence", "--workdir", str(base), "--concept", "cross", "--lora", str(file)]
    args += ["--num-per-prompt", "1", "--steps", "2", "--guidance-scales", "4", "--out", str(out)]
    assert cli.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["concepts"] == ["cross"] and results["rows"][0]["n"] == 8 + 24
    assert "color+shape" in capsys.readouterr().out

    full = [f"--config.pretrained={base}"]
    assert cli.main(train_args("finetune,cross,smoke", full_dir, data_dir, *full)) == 0
    tuned = load_run(full_dir)
    same = jax.tree.map(np.array_equal, tuned.text_encoder_params, model.text_encoder_params)
    assert tuned.kind == "run" and all(jax.tree.leaves(same))
    assert cli.main(args[:4] + ["--concept", "star"] + args[4:]) == 2
    assert "unknown shapes concept 'star'" in capsys.readouterr().err


# LCM-LoRA's targets (diffusers' train_lcm_distill_lora_sd_wds.py; the released
# latent-consistency/lcm-lora-sdv1-5): attention, projections, feed-forward, every resnet conv,
# the shortcut, the down/upsampler convs and the time-embedding projections.
LCM_LORA_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
    "time_emb_proj",
]  # fmt: skip


def test_lcm_lora_in_kohya_layout_with_the_lcm_sampler_matches_diffusers(
    tmp_path, clip_tokenizer_dir, monkeypatch
):
    """An LCM-LoRA over all of LCM-LoRA's targets, in the kohya layout the released ones use,
    sampled with `lcm` at 4 steps and guidance 1 (the seeds' "LCM-LoRA applicable to existing
    models") against diffusers' pipeline with LCMScheduler after `load_lora_weights`; the noise
    LCM adds between steps is ours, replayed into diffusers' `randn_tensor`."""
    import importlib

    import diffusers
    import tiny_checkpoints as tiny
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig
    from safetensors.torch import save_file
    from test_generate import _assert_within_one_level, _diffusers_uint8, _latents

    from ldm_jax.model import load_pretrained
    from ldm_jax.pipeline import generate
    from ldm_jax.rng import normal

    pipe = tiny.sd_pipeline(clip_tokenizer_dir)
    pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
    folder = tmp_path / "sd"
    pipe.save_pretrained(folder, safe_serialization=True)
    config = LoraConfig(r=8, lora_alpha=8, target_modules=LCM_LORA_TARGETS, init_lora_weights=False)
    layers = _peft_unet_layers(pipe.unet, config, seed=7)
    assert any("downsamplers" in k for k in layers) and any("conv_shortcut" in k for k in layers)
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in layers.items()})
    save_file({k: v.contiguous() for k, v in kohya.items()}, tmp_path / "lcm.safetensors")
    pipe.load_lora_weights(tmp_path, weight_name="lcm.safetensors", adapter_name="lcm")

    steps, prompts, seed = 4, ["a photo of an astronaut riding a horse", "a red circle"], 0
    nchw, nhwc = _latents(2)
    rng = jax.random.fold_in(jax.random.key(seed), 3)  # generate()'s sampler key
    draws = iter(
        torch.from_numpy(np.array(normal(jax.random.fold_in(rng, i), nhwc.shape)))
        .permute(0, 3, 1, 2)
        .contiguous()
        for i in range(steps - 1)
    )
    module = importlib.import_module("diffusers.schedulers.scheduling_lcm")
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: next(draws))
    kwargs = dict(num_inference_steps=steps, guidance_scale=1.0, height=tiny.SIZE, width=tiny.SIZE)
    with torch.no_grad():
        theirs = pipe(prompts, latents=nchw, output_type="np", **kwargs).images
    assert next(draws, None) is None  # diffusers drew exactly the noise we replayed
    sd = load_pretrained(folder)
    lora_file = tmp_path / "lcm.safetensors"
    ours = generate(
        sd, prompts, latents=nhwc, sampler="lcm", seed=seed, batch_size=2, lora=[lora_file],
        **kwargs,
    )  # fmt: skip
    _assert_within_one_level(ours, _diffusers_uint8(theirs))
    plain = generate(sd, prompts, latents=nhwc, sampler="lcm", seed=seed, batch_size=2, **kwargs)
    assert np.abs(plain.astype(int) - ours).max() > 10  # the LoRA changes the images


def test_per_block_weights_match_diffusers_set_adapters(tmp_path, clip_tokenizer_dir):
    """diffusers' per-block LoRA weights (`set_adapters(name, {"unet": {"down": ..., "mid":
    ..., "up": ...}})`, which also scale each block's resnets and samplers by its attention's
    weight) through `generate(..., lora=[(file, weights)])`: images within one 8-bit level;
    and the weights per layer as `block_weights` expands them."""
    import diffusers
    import tiny_checkpoints as tiny
    from peft import LoraConfig
    from test_generate import _assert_within_one_level, _diffusers_uint8, _latents

    from ldm_jax.model import load_pretrained
    from ldm_jax.pipeline import generate

    pipe = tiny.sd_pipeline(clip_tokenizer_dir)  # attention in down block 0 and up block 1
    pipe.save_pretrained(tmp_path / "sd", safe_serialization=True)
    targets = [*TARGETS, "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"]
    config = LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    layers = _peft_unet_layers(pipe.unet, config, seed=3)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path / "a", unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict()
    )
    pipe.load_lora_weights(tmp_path / "a", adapter_name="a")
    weights = {"down": {"block_0": 0.2}, "mid": 0.5, "up": {"block_1": [1.5, 0.6]}}
    pipe.set_adapters(["a"], adapter_weights=[{"unet": copy.deepcopy(weights)}])
    nchw, nhwc = _latents(1, seed=2)
    kwargs = dict(num_inference_steps=3, guidance_scale=5.0, height=tiny.SIZE, width=tiny.SIZE)
    with torch.no_grad():
        theirs = pipe("a red circle", latents=nchw, output_type="np", **kwargs).images
    sd = load_pretrained(tmp_path / "sd")
    file = tmp_path / "a" / "pytorch_lora_weights.safetensors"
    ours = generate(
        sd, "a red circle", latents=nhwc, sampler="ddim", lora=[(file, {"unet": weights})],
        **kwargs,
    )  # fmt: skip
    _assert_within_one_level(ours, _diffusers_uint8(theirs))
    whole = generate(sd, "a red circle", latents=nhwc, sampler="ddim", lora=[file], **kwargs)
    assert np.abs(whole.astype(int) - ours).max() > 10  # the block weights matter

    per_layer = lora.block_weights(lora.layer_paths(sd.unet_params), weights)
    expected = {
        ("down_blocks_0", "attentions_0", "proj_in"): 0.2,
        ("down_blocks_0", "resnets_0", "conv1"): 0.2,
        ("down_blocks_0", "downsamplers_0", "conv"): 0.2,
        ("down_blocks_1", "resnets_0", "conv1"): 1.0,  # no attention in the block
        ("mid_block", "attentions_0", "proj_in"): 0.5,
        ("mid_block", "resnets_0", "conv1"): 1.0,  # as diffusers: the mid resnets keep 1
        ("up_blocks_1", "resnets_0", "conv2"): 1.5,
        ("up_blocks_1", "attentions_1", "transformer_blocks_0", "attn2", "to_k"): 0.6,
        ("up_blocks_0", "upsamplers_0", "conv"): 1.0,
        ("conv_in",): 1.0,
    }
    assert {p: per_layer[p] for p in expected} == expected
    with pytest.raises(ValueError, match=r"expected 2 scales for up.block_1, got 3"):
        lora.block_weights(lora.layer_paths(sd.unet_params), {"up": {"block_1": [1, 0.5, 2]}})
    with pytest.raises(ValueError, match=r"per-block weights go under \"unet\""):
        generate(sd, "x", lora=[(file, {"down": 0.5})], num_inference_steps=1)


def test_kohya_export_and_fused_folder_load_in_diffusers(tmp_path, clip_tokenizer_dir):
    """Our adapters (B made non-zero, alpha != rank) written in the kohya layout load in
    diffusers with the U-Net and text-encoder outputs ours give; `ldm-jax convert --lora`
    writes the fused model as a diffusers folder that `from_pretrained` loads to the same U-Net
    outputs."""
    import diffusers
    import tiny_checkpoints as tiny

    from ldm_jax import cli
    from ldm_jax.convert.lora import save_lora
    from ldm_jax.model import load_pretrained, with_lora

    pipe = tiny.sd_pipeline(clip_tokenizer_dir)
    folder = tmp_path / "sd"
    pipe.save_pretrained(folder, safe_serialization=True)
    sd = load_pretrained(folder)

    def random_adapter(params, targets, seed):
        tree = lora.init(params, targets, 4, jax.random.key(seed))
        flat = traverse_util.flatten_dict(tree)
        for i, path in enumerate(flat):
            if path[-1] == "lora_B":
                key = jax.random.key(100 * seed + i)
                flat[path] = 0.3 * jax.random.normal(key, flat[path].shape)
        return lora.Adapter(traverse_util.unflatten_dict(flat), alpha=2.0)

    adapters = {
        "unet": random_adapter(sd.unet_params, TARGETS, 1),
        "text_encoder": random_adapter(sd.text_encoder_params[0], ["q_proj", "out_proj", "fc1"], 2),
    }
    file = save_lora(tmp_path / "kohya", adapters, TARGETS, layout="kohya")
    from safetensors.numpy import load_file

    keys = list(load_file(file))
    assert all(k.startswith(("lora_unet_", "lora_te1_")) for k in keys)
    assert any(k.endswith(".alpha") for k in keys)
    pipe.load_lora_weights(tmp_path / "kohya", adapter_name="k")
    fused = with_lora(sd, [file])
    inputs = _unet_inputs()
    want = _reference(pipe.unet, inputs)
    got = jax.jit(sd.unet.apply)(fused.unet_params, *inputs)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    ids = np.array([[49406, 320, 736, 2760, 49407] + [49407] * 72], np.int32)
    with torch.no_grad():
        want_text = pipe.text_encoder(torch.from_numpy(ids).long())[0].numpy()
    got_text = sd.text_encoders[0].apply(fused.text_encoder_params[0], ids).last_hidden_state
    np.testing.assert_allclose(got_text, want_text, atol=2e-5, rtol=1e-4)

    out = tmp_path / "fused"
    assert cli.main(["convert", str(folder), "--lora", str(file), "--out", str(out)]) == 0
    again = diffusers.StableDiffusionPipeline.from_pretrained(out)
    np.testing.assert_allclose(_reference(again.unet, inputs), want, atol=2e-5, rtol=1e-4)


def test_attention_processor_spelling_reads_as_peft(unet_pair):
    """diffusers' older attention-processor keys (`attn1.processor.to_q_lora.down.weight`, the
    text encoder's `self_attn.to_k_lora.up.weight` and `mlp.fc1.lora_linear_layer.down.weight`)
    give the adapter the PEFT keys give; diffusers' own converter maps the U-Net keys the same
    way."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    rng = np.random.default_rng(0)
    peft_keys = [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
    ]
    unet_peft, unet_old = {}, {}
    for module in peft_keys:
        old = module.replace(".attn1.to_q", ".attn1.processor.to_q_lora")
        old = old.replace(".attn2.to_out.0", ".attn2.processor.to_out_lora")
        for new_role, old_role in (("lora_A", "down"), ("lora_B", "up")):
            value = rng.normal(size=(4, 8) if new_role == "lora_A" else (8, 4)).astype(np.float32)
            unet_peft[f"{module}.{new_role}.weight"] = value
            unet_old[f"{old}.{old_role}.weight"] = value
    assert set(convert_unet_state_dict_to_peft(dict(unet_old))) == set(unet_peft)
    text = {
        "text_model.encoder.layers.0.self_attn.k_proj": "text_model.encoder.layers.0.self_attn.to_k_lora",
        "text_model.encoder.layers.0.mlp.fc1": "text_model.encoder.layers.0.mlp.fc1.lora_linear_layer",
    }
    text_peft, text_old = {}, {}
    for new, old in text.items():
        for new_role, old_role in (("lora_A", "down"), ("lora_B", "up")):
            value = rng.normal(size=(4, 8)).astype(np.float32)
            text_peft[f"text_encoder.{new}.{new_role}.weight"] = value
            text_old[f"text_encoder.{old}.{old_role}.weight"] = value
    new = peft_state_dict_to_adapters(
        {**{f"unet.{k}": v for k, v in unet_peft.items()}, **text_peft}
    )
    old = peft_state_dict_to_adapters({**{f"unet.{k}": v for k, v in unet_old.items()}, **text_old})
    assert jax.tree.all(jax.tree.map(np.array_equal, new, old))
    assert set(new) == {"unet", "text_encoder"}
