"""Original single-file checkpoints (CompVis / Stability layout) <-> diffusers names.

The independent answer is diffusers' own single-file loader: tiny random diffusers / transformers
models of each kind are written in the original layout by `save_single_file`; diffusers'
`from_single_file` (U-Net, VAE) and `create_diffusers_clip_model_from_ldm` (the text-encoder part of
`StableDiffusionPipeline.from_single_file`) must recover exactly the original tensors, and
`read_single_file` must return exactly the original state dicts plus configs that rebuild the same
networks (same outputs). Everything runs offline: the `config=` folders are written here.
"""

import pathlib
import pickle
import sys
import tracemalloc

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from ldm_jax.convert import original  # noqa: E402
from ldm_jax.convert.state_dict import CheckpointError  # noqa: E402

VAE = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    sample_size=32,
)
UNET = dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=32, sample_size=8)
SD1_UNET = UNET | dict(
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
)
SD2_UNET = SD1_UNET | dict(
    use_linear_projection=True, attention_head_dim=(1, 1), upcast_attention=True
)
XL_UNET = UNET | dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
    attention_head_dim=(1, 1),
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
)
# SDXL: context = CLIP-L (32) ++ bigG (64); added conditioning = pooled bigG (16) + 6 x 8.
SDXL_UNET = XL_UNET | dict(
    transformer_layers_per_block=(1, 2),
    cross_attention_dim=96,
    projection_class_embeddings_input_dim=16 + 6 * 8,
)
# Refiner: context = bigG (64); pooled (16) + 5 x 8 (sizes, crop, aesthetic score).
REFINER_UNET = XL_UNET | dict(
    transformer_layers_per_block=2,
    cross_attention_dim=64,
    projection_class_embeddings_input_dim=16 + 5 * 8,
)
CLIP = dict(
    vocab_size=1000,
    intermediate_size=37,
    num_attention_heads=1,
    max_position_embeddings=77,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
CLIP_L = CLIP | dict(hidden_size=32, num_hidden_layers=2, hidden_act="quick_gelu")
# 23 layers as diffusers ships ViT-H; the file gets a 24th that both loaders must drop.
OPENCLIP_H = CLIP | dict(hidden_size=32, num_hidden_layers=23, hidden_act="gelu")
OPENCLIP_BIGG = CLIP | dict(
    hidden_size=64, num_hidden_layers=2, hidden_act="gelu", projection_dim=16
)

SPECS = {
    "sd1": (SD1_UNET, {"text_encoder": CLIP_L}),
    "sd1-inpaint": (SD1_UNET | dict(in_channels=9), {"text_encoder": CLIP_L}),
    "sd2": (SD2_UNET, {"text_encoder": OPENCLIP_H}),
    "sdxl": (SDXL_UNET, {"text_encoder": CLIP_L, "text_encoder_2": OPENCLIP_BIGG}),
    "sdxl-refiner": (REFINER_UNET, {"text_encoder_2": OPENCLIP_BIGG}),
}
# Non-weight entries real checkpoints carry, which every loader must skip.
EXTRAS = {
    "alphas_cumprod": np.linspace(1, 0, 10, dtype=np.float32),
    "model_ema.num_updates": np.array(7, dtype=np.int32),
}


def _numpy(state_dict, prefix=""):
    return {prefix + k: v.detach().numpy().copy() for k, v in state_dict.items()}


class Checkpoint:
    """Tiny torch models of one kind, their numpy state dicts, the file and a config folder."""

    def __init__(self, kind, folder: pathlib.Path):
        unet_spec, te_specs = SPECS[kind]
        torch.manual_seed(0)
        self.kind = kind
        self.models = {
            "unet": diffusers.UNet2DConditionModel(**unet_spec).eval(),
            "vae": diffusers.AutoencoderKL(**VAE).eval(),
        }
        for name, spec in te_specs.items():
            config = transformers.CLIPTextConfig(**spec)
            cls = transformers.CLIPTextModelWithProjection if name == "text_encoder_2" else None
            self.models[name] = (cls or transformers.CLIPTextModel)(config).eval()
        self.state_dicts = {}
        for name, model in self.models.items():
            state_dict = _numpy(model.state_dict())
            if name.startswith("text_encoder"):  # checkpoint names keep `text_model.`
                state_dict = {
                    k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
                    for k, v in state_dict.items()
                }
            self.state_dicts[name] = state_dict
        self.config_dir = folder / "config"
        for name, model in self.models.items():
            if name.startswith("text_encoder"):
                model.config.save_pretrained(self.config_dir / name)
            else:
                model.save_config(self.config_dir / name)
        self.path = folder / f"{kind}.safetensors"
        original.save_single_file(self.path, kind, self.state_dicts)
        flat = load_file(str(self.path)) | EXTRAS
        if kind == "sd2":  # the ViT-H layer SD 2 does not use, its projection and logit scale
            rng = np.random.default_rng(0)
            prefix = "cond_stage_model.model."
            for key in [k for k in flat if k.startswith(prefix + "transformer.resblocks.22.")]:
                flat[key.replace(".22.", ".23.")] = rng.normal(size=flat[key].shape).astype(
                    np.float32
                )
            flat[prefix + "text_projection"] = rng.normal(size=(32, 32)).astype(np.float32)
            flat[prefix + "logit_scale"] = np.array(4.6, np.float32)
        save_file(flat, str(self.path))


@pytest.fixture(scope="module", params=list(SPECS))
def ckpt(request, tmp_path_factory):
    return Checkpoint(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return Checkpoint("sd1", tmp_path_factory.mktemp("sd1_extra"))


def _assert_same_torch(model, expected: dict):
    got = _numpy(model.state_dict())
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_diffusers_single_file_loader_recovers_the_models(ckpt):
    """diffusers' forward map applied to our file gives back every original tensor, exactly."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    for name, cls in (("unet", diffusers.UNet2DConditionModel), ("vae", diffusers.AutoencoderKL)):
        model = cls.from_single_file(
            str(ckpt.path), config=str(ckpt.config_dir), subfolder=name, local_files_only=True
        )
        _assert_same_torch(model, _numpy(ckpt.models[name].state_dict()))
    checkpoint = {k: torch.from_numpy(v) for k, v in load_file(str(ckpt.path)).items()}
    for name in ("text_encoder", "text_encoder_2"):
        if name not in ckpt.models:
            continue
        model = create_diffusers_clip_model_from_ldm(
            type(ckpt.models[name]),
            checkpoint,
            subfolder=name,
            config=str(ckpt.config_dir),
            local_files_only=True,
        )
        _assert_same_torch(model, _numpy(ckpt.models[name].state_dict()))


def test_read_single_file_returns_the_original_state_dicts(ckpt):
    kind, configs, state_dicts = original.read_single_file(ckpt.path)
    assert kind == ckpt.kind
    assert sorted(state_dicts) == sorted(ckpt.state_dicts)
    for name, expected in ckpt.state_dicts.items():
        got = state_dicts[name]
        assert sorted(got) == sorted(expected), name
        for key, value in expected.items():
            assert got.shape(key) == value.shape, key
            np.testing.assert_array_equal(got[key], value, err_msg=f"{name}: {key}")
    assert set(configs) == set(ckpt.state_dicts) | {"scheduler"}


def _unet_inputs(config, batch=2):
    gen = torch.Generator().manual_seed(1)
    size = config["sample_size"]
    args = (
        torch.randn(batch, config["in_channels"], size, size, generator=gen),
        torch.tensor([10, 500]),
        torch.randn(batch, 5, config["cross_attention_dim"], generator=gen),
    )
    kwargs = {}
    if config["addition_embed_type"] == "text_time":
        n_time = 5 if config["projection_class_embeddings_input_dim"] == 56 else 6
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 16, generator=gen),
            "time_ids": torch.rand(batch, n_time, generator=gen) * 1024,
        }
    return args, kwargs


def test_configs_rebuild_the_same_networks(ckpt):
    """Configs from shapes + the released models' conventions build networks that load the
    converted weights strictly and compute what the originals compute."""
    kind, configs, state_dicts = original.read_single_file(ckpt.path)
    orig = ckpt.models
    unet_config = {k: v for k, v in configs["unet"].items() if not k.startswith("_")}
    unet_config["sample_size"] = SPECS[kind][0]["sample_size"]
    unet = diffusers.UNet2DConditionModel(**unet_config).eval()
    unet.load_state_dict({k: torch.from_numpy(state_dicts["unet"][k]) for k in state_dicts["unet"]})
    for key in ("block_out_channels", "down_block_types", "up_block_types", "in_channels"):
        assert list(np.atleast_1d(unet.config[key])) == list(
            np.atleast_1d(orig["unet"].config[key])
        )
    args, kwargs = _unet_inputs(unet.config)
    with torch.no_grad():
        want = orig["unet"](*args, **kwargs).sample
        got = unet(*args, **kwargs).sample
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6, rtol=0)

    vae_config = {k: v for k, v in configs["vae"].items() if not k.startswith("_")}
    vae = diffusers.AutoencoderKL(**vae_config).eval()
    vae.load_state_dict({k: torch.from_numpy(state_dicts["vae"][k]) for k in state_dicts["vae"]})
    image = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        np.testing.assert_allclose(
            vae(image, sample_posterior=False).sample.numpy(),
            orig["vae"](image, sample_posterior=False).sample.numpy(),
            atol=1e-6,
            rtol=0,
        )
    assert configs["vae"]["scaling_factor"] == (0.13025 if kind.startswith("sdxl") else 0.18215)

    ids = torch.tensor([[0, 5, 9, 2, 1, 1], [0, 7, 2, 1, 1, 1]])
    for name in ("text_encoder", "text_encoder_2"):
        if name not in orig:
            continue
        config = transformers.CLIPTextConfig(**configs[name])
        assert config.architectures[0] == type(orig[name]).__name__
        model = type(orig[name])(config).eval()
        wanted_names = set(model.state_dict())
        weights = {
            (k if k in wanted_names else k.removeprefix("text_model.")): torch.from_numpy(
                state_dicts[name][k]
            )
            for k in state_dicts[name]
        }
        model.load_state_dict(weights)
        with torch.no_grad():
            want, got = orig[name](ids), model(ids)
        np.testing.assert_allclose(
            got.last_hidden_state.numpy(), want.last_hidden_state.numpy(), atol=1e-6, rtol=0
        )
        pooled = "text_embeds" if name == "text_encoder_2" else "pooler_output"
        np.testing.assert_allclose(
            getattr(got, pooled).numpy(), getattr(want, pooled).numpy(), atol=1e-6
        )

    expected_prediction = "v_prediction" if kind == "sd2" else "epsilon"
    assert configs["scheduler"]["prediction_type"] == expected_prediction
    scheduler_cls = getattr(diffusers, configs["scheduler"]["_class_name"])
    scheduler_cls.from_config(configs["scheduler"])  # a config diffusers accepts


def test_round_trip_to_single_file(ckpt):
    """to_single_file(read_single_file(f)) rewrites f, less the entries loaders skip."""
    kind, _, state_dicts = original.read_single_file(ckpt.path)
    flat = load_file(str(ckpt.path))
    skipped = set(EXTRAS)
    if kind == "sd2":
        skipped |= {
            k
            for k in flat
            if ".resblocks.23." in k or k.endswith(("text_projection", "logit_scale"))
        }
    again = original.to_single_file(kind, state_dicts)
    assert sorted(again) == sorted(set(flat) - skipped)
    for key, value in again.items():
        np.testing.assert_array_equal(value, flat[key], err_msg=key)


# Original names as the CompVis / sgm modules create them (openaimodel.py, model.py, open_clip),
# checked by hand because diffusers' loader also accepts some wrong ones (e.g. the upsampler
# index, 2-D VAE attention kernels) that A1111 / ComfyUI would reject.
HAND_CHECKED = {
    "sd1": [
        ("model.diffusion_model.input_blocks.1.1.proj_in.weight", "unet", "down_blocks.0.attentions.0.proj_in.weight", None),
        ("model.diffusion_model.input_blocks.3.0.op.weight", "unet", "down_blocks.0.downsamplers.0.conv.weight", None),
        ("model.diffusion_model.output_blocks.2.1.conv.weight", "unet", "up_blocks.0.upsamplers.0.conv.weight", None),
        ("model.diffusion_model.output_blocks.5.1.proj_out.weight", "unet", "up_blocks.1.attentions.2.proj_out.weight", None),
        ("model.diffusion_model.middle_block.2.emb_layers.1.bias", "unet", "mid_block.resnets.1.time_emb_proj.bias", None),
        ("first_stage_model.encoder.mid.attn_1.q.weight", "vae", "encoder.mid_block.attentions.0.to_q.weight", "conv"),
        ("first_stage_model.decoder.up.1.block.1.conv2.weight", "vae", "decoder.up_blocks.0.resnets.1.conv2.weight", None),
        ("first_stage_model.decoder.up.1.upsample.conv.weight", "vae", "decoder.up_blocks.0.upsamplers.0.conv.weight", None),
        ("first_stage_model.encoder.down.1.block.0.nin_shortcut.weight", "vae", "encoder.down_blocks.1.resnets.0.conv_shortcut.weight", None),
        ("cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.bias", "text_encoder", "text_model.encoder.layers.1.mlp.fc2.bias", None),
    ],
    "sd2": [
        ("cond_stage_model.model.positional_embedding", "text_encoder", "text_model.embeddings.position_embedding.weight", None),
        ("cond_stage_model.model.transformer.resblocks.22.attn.in_proj_bias", "text_encoder", "text_model.encoder.layers.22.self_attn", "qkv"),
    ],
    "sdxl": [
        ("model.diffusion_model.label_emb.0.2.weight", "unet", "add_embedding.linear_2.weight", None),
        ("model.diffusion_model.output_blocks.2.2.conv.weight", "unet", "up_blocks.0.upsamplers.0.conv.weight", None),
        ("model.diffusion_model.middle_block.1.transformer_blocks.1.attn2.to_k.weight", "unet", "mid_block.attentions.0.transformer_blocks.1.attn2.to_k.weight", None),
        ("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight", "text_encoder", "text_model.final_layer_norm.weight", None),
        ("conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight", "text_encoder_2", "text_model.encoder.layers.1.self_attn", "qkv"),
        ("conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight", "text_encoder_2", "text_model.encoder.layers.0.mlp.fc1.weight", None),
        ("conditioner.embedders.1.model.text_projection", "text_encoder_2", "text_projection.weight", "T"),
    ],
    "sdxl-refiner": [
        ("conditioner.embedders.0.model.ln_final.bias", "text_encoder_2", "text_model.final_layer_norm.bias", None),
        ("conditioner.embedders.0.model.token_embedding.weight", "text_encoder_2", "text_model.embeddings.token_embedding.weight", None),
    ],
}  # fmt: skip


def test_original_names_by_hand(ckpt):
    flat = load_file(str(ckpt.path))
    for file_key, component, name, transform in HAND_CHECKED.get(ckpt.kind, []):
        sd = ckpt.state_dicts[component]
        if transform == "qkv":
            leaf = file_key.rsplit("_", 1)[1]
            want = np.concatenate([sd[f"{name}.{q}_proj.{leaf}"] for q in "qkv"])
        elif transform == "T":
            want = sd[name].T
        elif transform == "conv":  # nn.Linear [out, in] stored as a 1x1 conv [out, in, 1, 1]
            want = sd[name][:, :, None, None]
        else:
            want = sd[name]
        np.testing.assert_array_equal(flat[file_key], want, err_msg=file_key)


def test_prediction_type_argument(sd1):
    _, configs, _ = original.read_single_file(sd1.path)
    assert configs["scheduler"]["prediction_type"] == "epsilon"
    _, configs, _ = original.read_single_file(sd1.path, prediction_type="v_prediction")
    assert configs["scheduler"]["prediction_type"] == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type"):
        original.read_single_file(sd1.path, prediction_type="eps")


def test_ckpt_through_torch_load_weights_only(sd1, tmp_path):
    flat = load_file(str(sd1.path))
    path = tmp_path / "model.ckpt"
    torch.save(
        {"state_dict": {k: torch.from_numpy(v) for k, v in flat.items()}, "global_step": 3}, path
    )
    kind, _, state_dicts = original.read_single_file(path)
    assert kind == "sd1"
    for name, expected in sd1.state_dicts.items():
        for key, value in expected.items():
            np.testing.assert_array_equal(state_dicts[name][key], value, err_msg=key)


class _NotATensor:
    pass


def test_text_projection_saved_as_linear(tmp_path):
    """Some tools store bigG's projection as an nn.Linear weight ([dim, width]) instead."""
    ckpt = Checkpoint("sdxl-refiner", tmp_path)
    flat = load_file(str(ckpt.path))
    prefix = "conditioner.embedders.0.model."
    flat[prefix + "text_projection.weight"] = flat.pop(prefix + "text_projection").T.copy()
    path = tmp_path / "linear_projection.safetensors"
    save_file(flat, str(path))
    _, configs, state_dicts = original.read_single_file(path)
    want = ckpt.state_dicts["text_encoder_2"]["text_projection.weight"]
    np.testing.assert_array_equal(state_dicts["text_encoder_2"]["text_projection.weight"], want)
    assert configs["text_encoder_2"]["projection_dim"] == 16


def test_pickle_with_objects_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": _NotATensor()}}, f, protocol=2)
    with pytest.raises(CheckpointError, match="weights_only"):
        original.read_single_file(path)


def test_pickle_without_torch_says_torch_is_needed(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, path)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(CheckpointError, match="torch"):
        original.read_single_file(path)


def test_unmapped_keys_are_listed(sd1, tmp_path):
    flat = load_file(str(sd1.path))
    flat["model.diffusion_model.input_blocks.1.0.extra.weight"] = np.zeros(2, np.float32)
    flat["cond_stage_model.transformer.vision_model.x"] = np.zeros(2, np.float32)
    flat["something_else"] = np.zeros(2, np.float32)
    path = tmp_path / "extra.safetensors"
    save_file(flat, str(path))
    with pytest.raises(CheckpointError) as err:
        original.read_single_file(path)
    for key in ("input_blocks.1.0.extra.weight", "vision_model.x", "something_else"):
        assert key in str(err.value)


def test_unknown_layout_lists_what_was_found(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"transformer.blocks.0.weight": np.zeros(2, np.float32)}, str(path))
    with pytest.raises(CheckpointError, match=r"transformer\.blocks"):
        original.read_single_file(path)


def test_truncated_file_is_a_clear_error(sd1, tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(sd1.path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        original.read_single_file(path)


@pytest.mark.parametrize(
    "width, label_emb, kind",
    [(768, False, "sd1"), (1024, False, "sd2"), (2048, True, "sdxl"), (1280, True, "sdxl-refiner")],
)
def test_detect_kind_from_unet_alone(width, label_emb, kind):
    """Files without text encoders: the U-Net's cross-attention width names the release."""
    shapes = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (
            320,
            width,
        ),
    }
    if label_emb:
        shapes["model.diffusion_model.label_emb.0.0.weight"] = (1280, 2816)
    assert original.detect_kind(shapes, shapes.__getitem__) == kind
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)
    assert original.detect_kind(shapes, shapes.__getitem__) == kind + "-inpaint"


def test_detect_kind_errors():
    shapes = {
        "model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (32, 48),
    }
    with pytest.raises(CheckpointError, match="cannot tell"):
        original.detect_kind(shapes, shapes.__getitem__)
    shapes["cond_stage_model.model.positional_embedding"] = (77, 32)
    shapes["model.diffusion_model.label_emb.0.0.weight"] = (128, 64)
    with pytest.raises(CheckpointError, match="inconsistent"):
        original.detect_kind(shapes, shapes.__getitem__)


def test_to_single_file_errors(sd1):
    with pytest.raises(ValueError, match="kind"):
        original.to_single_file("sd3", sd1.state_dicts)
    with pytest.raises(ValueError, match="text_encoder_2"):
        original.to_single_file("sd1", sd1.state_dicts | {"text_encoder_2": {}})
    unet = dict(sd1.state_dicts["unet"]) | {"not_a_unet_module.weight": np.zeros(1)}
    with pytest.raises(CheckpointError, match="not_a_unet_module"):
        original.to_single_file("sd1", {"unet": unet})


def test_reading_is_lazy(sd1):
    """read_single_file allocates (almost) nothing; tensors are read one at a time on access."""
    size = sd1.path.stat().st_size
    tracemalloc.start()
    try:
        _, _, state_dicts = original.read_single_file(sd1.path)
        _, after_read = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        largest = 0
        for component in state_dicts.values():
            for key in component:
                largest = max(largest, component[key].nbytes)
        _, while_reading = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after_read < 0.1 * size, (after_read, size)
    # One tensor alive at a time (plus a temporary for transforms), not the whole file.
    assert while_reading < 3 * largest + 1_000_000 < size, (while_reading, largest, size)


# The released U-Nets (diffusers' hub configs; the diffusers defaults are SD 1.5's, except the
# cross-attention width), built on the meta device: names and shapes only, no memory.
CA, D, U, CU = "CrossAttnDownBlock2D", "DownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"
XL = dict(use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256)
RELEASED_UNETS = {
    "sd1": dict(cross_attention_dim=768, sample_size=64),
    "sd2": dict(
        cross_attention_dim=1024,
        attention_head_dim=[5, 10, 20, 20],
        use_linear_projection=True,
        upcast_attention=True,
        sample_size=96,
    ),
    "sdxl": XL
    | dict(
        block_out_channels=[320, 640, 1280],
        down_block_types=[D, CA, CA],
        up_block_types=[CU, CU, U],
        transformer_layers_per_block=[1, 2, 10],
        attention_head_dim=[5, 10, 20],
        cross_attention_dim=2048,
        projection_class_embeddings_input_dim=2816,
        sample_size=128,
    ),
    "sdxl-refiner": XL
    | dict(
        block_out_channels=[384, 768, 1536, 1536],
        down_block_types=[D, CA, CA, D],
        up_block_types=[U, CU, CU, U],
        transformer_layers_per_block=4,
        attention_head_dim=[6, 12, 24, 24],
        cross_attention_dim=1280,
        projection_class_embeddings_input_dim=2560,
        sample_size=128,
    ),
}
SD_VAE = dict(
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2,
    latent_channels=4,
)


def _zeros_like(model):
    """Zero-stride numpy stand-ins (no memory) for a meta-device model's state dict."""
    return {
        k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in model.state_dict().items()
    }


@pytest.mark.parametrize("kind", list(RELEASED_UNETS))
def test_released_architectures_match_diffusers_mapping(kind):
    """At full size: the configs read from shapes equal the released ones, and every U-Net / VAE
    tensor comes from the entry diffusers' convert_ldm_*_checkpoint takes it from."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**RELEASED_UNETS[kind])
        vae = diffusers.AutoencoderKL(**SD_VAE)
    flat = original.to_single_file(kind, {"unet": _zeros_like(unet), "vae": _zeros_like(vae)})
    # No text encoders in the file: the kind comes from the U-Net's cross-attention width.
    got_kind, configs, state_dicts = original.convert_original(flat)
    assert got_kind == kind
    for key, value in unet.config.items():
        if key in configs["unet"] and key != "transformer_layers_per_block":
            want = list(value) if isinstance(value, tuple) else value
            assert configs["unet"][key] == want, key
    depth = configs["unet"]["transformer_layers_per_block"]
    assert (
        np.broadcast_to(depth, 3).tolist()
        == np.broadcast_to(unet.config.transformer_layers_per_block, 3).tolist()
    )
    for key in ("block_out_channels", "layers_per_block", "latent_channels"):
        assert configs["vae"][key] == vae.config[key], key

    for name, model, convert in (
        ("unet", unet, convert_ldm_unet_checkpoint),
        ("vae", vae, convert_ldm_vae_checkpoint),
    ):
        reference = convert(flat, dict(model.config))
        ours = state_dicts[name]
        assert set(reference) == set(ours) == set(model.state_dict()), name
        for key, value in reference.items():
            source = ours.sources[key]
            if source.op == "copy":
                assert value is flat[source.key], key
            else:  # VAE attention 1x1 conv -> linear: same entry, same squeezed shape
                assert value.shape == ours.shape(key) and np.shares_memory(value, flat[source.key])
