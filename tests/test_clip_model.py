"""The CLIP image tower and whole-`CLIPModel` loading (`ldm_jax.convert.clip_model`): tiny random
transformers `CLIPModel`s saved as folders with the real tokenizer and a `CLIPImageProcessor`,
loaded by ldm_jax and compared with PyTorch on the same inputs; preprocessing against
transformers' PIL `CLIPImageProcessor`; config reading; strictness errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.convert import CheckpointError, UnsupportedConfigError
from ldm_jax.convert.clip_model import (
    ImagePreprocessing,
    convert_clip_model_state_dict,
    load_clip_model,
    preprocess_images,
)
from ldm_jax.convert.configs import clip_model_fields
from ldm_jax.models.clip import CLIP_VISION_VARIANTS, clip_vision_from_variant
from ldm_jax.models.layers import count_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# float32 on both sides; XLA and PyTorch sum matmuls, convs and layer norms in different orders,
# which leaves ~1e-6 relative rounding on O(1) outputs: 1e-4 is the project's parity bound.
ATOL = 1e-4
IMAGE_SIZE = 32  # tiny_checkpoints.CLIP_IMAGE_SIZE
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon, highly detailed"]


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])  # OpenAI / OpenCLIP activations
def clip(request, tmp_path_factory, clip_tokenizer_dir):
    """(folder, torch CLIPModel, loaded bundle) of a tiny random CLIPModel."""
    import tiny_checkpoints

    folder = tmp_path_factory.mktemp(f"clip_{request.param}")
    ref = tiny_checkpoints.clip_model(folder, clip_tokenizer_dir, request.param)
    return folder, ref, load_clip_model(folder)


def _images(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((50, 37, 3), (20, 64, 3))]


def max_diff(ours, want):
    ours, want = np.asarray(ours), np.asarray(want)
    assert ours.shape == want.shape, (ours.shape, want.shape)
    return float(np.max(np.abs(ours - want)))


# ---------------------------------------------------------------- parity with transformers
def test_clip_model_matches_transformers(clip):
    _, ref, model = clip
    assert model.vision.hidden_act == model.text.hidden_act == ref.config.vision_config.hidden_act
    pixels = model.preprocess(_images())
    assert pixels.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and pixels.dtype == np.float32
    vision = jax.jit(model.vision.apply)(model.vision_params, pixels)
    ids = model.tokenizer(PROMPTS)  # int32[2, 77], padded with end-of-text, no attention mask
    text = jax.jit(model.text.apply)(model.text_params, ids)
    # The reference path of a CLIP score: transformers' tokenizer, padded to the longest prompt.
    hf_text = model.tokenizer._tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch_pixels = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
        want_vision = ref.vision_model(pixel_values=torch_pixels)
        want_image = ref.get_image_features(pixel_values=torch_pixels).pooler_output
        want_text = ref.get_text_features(input_ids=torch.from_numpy(ids).long()).pooler_output
        want_text_masked = ref.get_text_features(**hf_text).pooler_output
        logits = ref(**hf_text, pixel_values=torch_pixels).logits_per_image
    cosine = lambda a, b: (
        (a / np.linalg.norm(a, axis=-1, keepdims=True))
        @ (b / np.linalg.norm(b, axis=-1, keepdims=True)).T
    )
    ours_logits = np.exp(model.logit_scale) * cosine(vision.image_embeds, text.text_embeds)
    diffs = {
        "image_embeds": max_diff(vision.image_embeds, want_image.numpy()),
        "pooled_output": max_diff(vision.pooled_output, want_vision.pooler_output.numpy()),
        "last_hidden_state": max_diff(
            vision.last_hidden_state, want_vision.last_hidden_state.numpy()
        ),
        "text_embeds": max_diff(text.text_embeds, want_text.numpy()),
        "text_embeds_vs_masked": max_diff(text.text_embeds, want_text_masked.numpy()),
        "logits_per_image": max_diff(ours_logits, logits.numpy()),
    }
    print(model.vision.hidden_act, {k: f"{v:.2g}" for k, v in diffs.items()})
    assert all(v <= ATOL for v in diffs.values()), diffs
    assert model.logit_scale == ref.logit_scale.item() == 2.0


def test_pickled_weights_load_the_same(clip, tmp_path):
    """pytorch_model.bin (older releases) through read_state_dict gives the same parameters."""
    folder, ref, model = clip
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / name, tmp_path)
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    again = load_clip_model(tmp_path)
    assert again.preprocessing.size == IMAGE_SIZE  # no preprocessor_config: the tower's size
    for ours, want in [(again.text_params, model.text_params),
                       (again.vision_params, model.vision_params)]:  # fmt: skip
        jax.tree_util.tree_map(np.testing.assert_array_equal, ours, want)


# ---------------------------------------------------------------- preprocessing
@pytest.mark.parametrize(
    "size,crop", [(32, (32, 32)), (224, (224, 224)), (32, (40, 36))]
)  # downsampled and upsampled; the last crop is wider than the resized image: zero padding
def test_preprocess_matches_clip_image_processor(size, crop):
    images = _images(1)
    processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": crop[0], "width": crop[1]}
    )
    want = processor(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    ours = preprocess_images(images, size, crop_size=crop)
    assert ours.dtype == np.float32
    assert max_diff(ours, want) <= 1e-6  # the same PIL resize and float ops: bit-exact (0.0)
    stacked = np.stack([images[0], images[0]])  # uint8[N, H, W, 3] works as a list does
    np.testing.assert_array_equal(preprocess_images(stacked, size, crop_size=crop)[1], ours[0])


def test_preprocessor_config_read_like_transformers():
    """openai/clip-vit-large-patch14's preprocessor_config.json: int size and crop_size."""
    openai = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
              "feature_extractor_type": "CLIPFeatureExtractor", "resample": 3, "size": 224,
              "image_mean": [0.48145466, 0.4578275, 0.40821073],
              "image_std": [0.26862954, 0.26130258, 0.27577711]}  # fmt: skip
    ours = ImagePreprocessing.from_config(openai)
    assert ours == ImagePreprocessing()
    hf = transformers.CLIPImageProcessorPil(**openai)
    assert (hf.size.shortest_edge, hf.crop_size.height, hf.crop_size.width) == (224, 224, 224)
    assert ours.image_mean == tuple(hf.image_mean) and ours.rescale_factor == hf.rescale_factor
    with pytest.raises(UnsupportedConfigError, match="do_center_crop=False"):
        ImagePreprocessing.from_config({**openai, "do_center_crop": False})
    with pytest.raises(UnsupportedConfigError, match="shortest_edge"):
        ImagePreprocessing.from_config({**openai, "size": {"height": 224, "width": 224}})
    with pytest.raises(ValueError, match=r"uint8\[H, W, 3\]"):
        preprocess_images([np.zeros((8, 8, 4), np.uint8)])


# ---------------------------------------------------------------- config and module
def test_clip_config_read_like_transformers():
    """A legacy `<name>_dict` (as in openai/clip-vit-large-patch14's config.json) overrides its
    sub-config, with defaults for what it omits: here eos_token_id 2 -> 49407, gelu ->
    quick_gelu, exactly as transformers' CLIPConfig reads it."""
    text = {"model_type": "clip_text_model", "eos_token_id": 2, "hidden_size": 768,
            "hidden_act": "gelu", "num_hidden_layers": 12}  # fmt: skip
    vision = {"model_type": "clip_vision_model", "hidden_size": 1024, "hidden_act": "gelu",
              "num_attention_heads": 16, "patch_size": 14, "image_size": 224}  # fmt: skip
    legacy_vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                     "num_hidden_layers": 24, "patch_size": 14}  # fmt: skip
    configs = [
        {"model_type": "clip", "projection_dim": 768, "text_config": text, "vision_config": vision},
        {"model_type": "clip", "projection_dim": 768, "text_config": text, "vision_config": vision,
         "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072,
                              "num_attention_heads": 12, "num_hidden_layers": 12},
         "vision_config_dict": legacy_vision},
        {"model_type": "clip"},  # everything default: ViT-B/32
    ]  # fmt: skip
    for config in configs:
        hf = transformers.CLIPConfig.from_dict(config)
        text_fields, vision_fields = clip_model_fields(config)
        for fields, hf_sub in [(text_fields, hf.text_config), (vision_fields, hf.vision_config)]:
            for key, value in fields.items():
                if key != "legacy_argmax_pooling":
                    want = hf.projection_dim if key == "projection_dim" else getattr(hf_sub, key)
                    assert value == want, (key, value, want)
        assert text_fields["legacy_argmax_pooling"] == (hf.text_config.eos_token_id == 2)
    # The legacy config is openai/clip-vit-large-patch14's image tower: the vit-l-14 variant.
    vit_l = {**CLIP_VISION_VARIANTS["vit-l-14"], "layer_norm_eps": 1e-5}
    assert clip_model_fields(configs[1])[1] == vit_l


def test_vision_tower_shapes_bidirectional_and_vit_l_count():
    model = clip_vision_from_variant("tiny")
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    params = jax.jit(model.init)(jax.random.key(1), x)
    apply = jax.jit(lambda p, x: model.apply(p, x, output_hidden_states=True))
    out = apply(params, x)
    assert out.last_hidden_state.shape == (2, 1 + 16, 32) and out.pooled_output.shape == (2, 32)
    assert out.image_embeds.shape == (2, 16) and len(out.hidden_states) == 2 + 1
    # No causal mask: changing only the last patch changes the class token's output.
    changed = apply(params, x.at[:, -8:, -8:].set(0.0))
    assert not np.allclose(out.pooled_output, changed.pooled_output)
    with pytest.raises(ValueError, match="does not match"):
        model.apply(params, jnp.zeros((1, 40, 40, 3)))
    vit_l = clip_vision_from_variant("vit-l-14")
    shapes = jax.eval_shape(vit_l.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    assert count_params(shapes) == 303_966_208  # transformers CLIPVisionModelWithProjection


# ---------------------------------------------------------------- errors
def _copy(folder, dst, config=None, drop=(), add=None):
    """A copy of a CLIPModel folder with a changed config and/or state dict."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(folder, dst)
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config))
    tensors = {k: v for k, v in load_file(folder / "model.safetensors").items() if k not in drop}
    save_file({**tensors, **(add or {})}, dst / "model.safetensors")
    return dst


def test_errors_name_what_is_wrong(clip, tmp_path):
    folder, ref, model = clip
    with pytest.raises(FileNotFoundError, match="no CLIP model folder"):
        load_clip_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_clip_model(tmp_path / "empty")
    config = json.loads((folder / "config.json").read_text())
    text_only = _copy(folder, tmp_path / "text", config=config["text_config"])
    with pytest.raises(UnsupportedConfigError, match="model_type='clip_text_model'"):
        load_clip_model(text_only)
    relu = {**config, "vision_config": {**config["vision_config"], "hidden_act": "relu"}}
    with pytest.raises(UnsupportedConfigError, match="hidden_act='relu'"):
        load_clip_model(_copy(folder, tmp_path / "relu", config=relu))
    bad = _copy(folder, tmp_path / "keys", drop=["vision_model.post_layernorm.bias"],
                add={"vision_model.extra.weight": np.zeros(3, np.float32)})  # fmt: skip
    with pytest.raises(CheckpointError) as error:
        load_clip_model(bad)
    message = str(error.value)
    assert "missing keys (1):\n    vision_model.post_layernorm.bias" in message
    assert "unexpected keys (1):\n    vision_model.extra.weight" in message
    wide = model.vision.clone(hidden_size=64)
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    with pytest.raises(CheckpointError, match="shape mismatch"):
        convert_clip_model_state_dict(model.text, wide, state)


# ---------------------------------------------------------------- CLIP score
def test_clip_score_matches_transformers(clip, tmp_path, capsys):
    """100 * max(cos, 0) of each (image, prompt) pair, against transformers end to end (its own
    PIL preprocessing, tokenizer padding and projections); then `eval clip-score` on a folder."""
    from PIL import Image

    from ldm_jax import cli
    from ldm_jax.eval.clip_score import ClipScorer

    folder, ref, model = clip
    # every image with every prompt: a random model's cosines have both signs
    captions = [*PROMPTS, "red", "a bowl of soup", "", "sunset over the sea", "zzz", "42"]
    images = [im for im in _images(3) for _ in captions]
    prompts = captions * 2
    scorer = ClipScorer(model, batch_size=16)  # batch > N: the padded rows must not leak in
    processor = transformers.CLIPImageProcessorPil.from_pretrained(folder)
    inputs = model.tokenizer._tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        image = ref.get_image_features(pixel_values=pixels).pooler_output.numpy()
        text = ref.get_text_features(**inputs).pooler_output.numpy()
    norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    cosine = np.sum(norm(image) * norm(text), -1)
    # A random CLIP's cosines are mostly negative; "zzz" with the second image is +0.004 (both
    # activations), so the clip at 0 is checked both ways. Deterministic: seeded weights, images.
    assert (cosine > 0).any() and (cosine < 0).any()
    # 1e-5: cosines of unit vectors from embeddings within 1e-6 of transformers' (see above)
    np.testing.assert_allclose(scorer.cosine_similarities(images, prompts), cosine, atol=1e-5)
    want = 100 * np.maximum(cosine, 0)
    np.testing.assert_allclose(scorer.scores(images, prompts), want, atol=1e-3, rtol=0)

    samples = tmp_path / "samples"
    samples.mkdir()
    records = []
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        Image.fromarray(image).save(samples / f"{i:05d}.png")
        records.append({"file": f"{i:05d}.png", "prompt": prompt, "seed": i})
    (samples / "manifest.json").write_text(json.dumps(records))
    assert cli.main(["eval", "clip-score", "--images", str(samples), "--clip", str(folder)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_images"] == len(images)
    assert abs(result["clip_score"] - float(np.mean(want))) < 1e-3
    (samples / "manifest.json").write_text(json.dumps(records[:1]))
    assert cli.main(["eval", "clip-score", "--images", str(samples), "--clip", str(folder)]) == 2
    assert f"no prompt for {len(images) - 1} images" in capsys.readouterr().err
