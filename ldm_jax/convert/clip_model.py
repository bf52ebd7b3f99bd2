"""A whole transformers `CLIPModel` folder (e.g. openai/clip-vit-large-patch14) for CLIP score.

A `CLIPModel` folder holds `config.json` (a `CLIPConfig`: `text_config`, `vision_config`,
`projection_dim`), the weights (`model.safetensors`, a sharded index, or `pytorch_model.bin`),
the tokenizer files and `preprocessor_config.json` (a `CLIPImageProcessor`). `load_clip_model`
turns it into a `CLIPModelBundle`: both towers with their projections, so that
`text_embeds` = transformers `get_text_features` and `image_embeds` = `get_image_features`.

Weights convert strictly by the naming rule of `ldm_jax.convert.naming`: the checkpoint keys are
`text_model.*`, `text_projection.weight`, `vision_model.*`, `visual_projection.weight` and
`logit_scale`; every one must be used and every parameter found (`position_ids` buffers aside).

`preprocess_images` is transformers' PIL `CLIPImageProcessor` (`CLIPImageProcessorPil` in
transformers 5) step by step on the host, so that CLIP scores match the reference bit for bit:
resize the shortest side with PIL bicubic, center crop, rescale, normalize.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.convert import configs as cfg
from ldm_jax.convert.diffusers import find_weights
from ldm_jax.convert.naming import state_dict_to_params
from ldm_jax.convert.state_dict import CheckpointError, read_state_dict
from ldm_jax.models.clip import CLIPTextTransformer, CLIPVisionTransformer

# OpenAI CLIP's normalization (transformers `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`), RGB.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the `resample` of CLIP's preprocessor_config

# Checkpoint prefix -> (tower, prefix inside our tower module).
_PREFIXES = (
    ("text_model.", "text", ""),
    ("text_projection.", "text", "text_projection."),
    ("vision_model.", "vision", ""),
    ("visual_projection.", "vision", "visual_projection."),
)


# ---------------------------------------------------------------- image preprocessing
@dataclasses.dataclass(frozen=True)
class ImagePreprocessing:
    """The options of a `CLIPImageProcessor` that `preprocess_images` implements.

    size: the shortest side after resizing (`size.shortest_edge`); crop_size: (height, width)
    of the center crop; resample: a PIL resampling filter code.
    """

    size: int = 224
    crop_size: tuple[int, int] = (224, 224)
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = PIL_BICUBIC

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ImagePreprocessing:
        """From a `preprocessor_config.json` dict, with `CLIPImageProcessor`'s defaults. An int
        `size` is the shortest side and an int `crop_size` a square (older configs, e.g.
        openai/clip-vit-large-patch14, as transformers' `get_size_dict` reads them)."""
        bad = [
            f"{flag}=False"
            for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize")
            if config.get(flag, True) is False
        ]
        size = config.get("size", 224)
        if isinstance(size, Mapping):
            if set(size) - {"shortest_edge"} or "shortest_edge" not in size:
                bad.append(f"size={dict(size)} (ldm_jax implements {{'shortest_edge': n}})")
            size = size.get("shortest_edge")
        crop = config.get("crop_size", 224)
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        if not isinstance(crop, Mapping) or set(crop) != {"height", "width"}:
            bad.append(f"crop_size={crop!r} (ldm_jax implements {{'height': h, 'width': w}})")
        if bad:
            raise cfg.UnsupportedConfigError(
                "preprocessor config: unsupported options: " + ", ".join(bad)
            )
        return cls(
            size=int(size),
            crop_size=(int(crop["height"]), int(crop["width"])),
            image_mean=tuple(config.get("image_mean", OPENAI_CLIP_MEAN)),
            image_std=tuple(config.get("image_std", OPENAI_CLIP_STD)),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
            resample=int(config.get("resample", PIL_BICUBIC)),
        )


def _shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the short side `size` and the long side int(size * long / short),
    truncated: transformers `get_resize_output_image_size(..., default_to_square=False)`."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def _center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers `image_transforms.center_crop` on [H, W, C]: offsets (H - height) // 2 and
    (W - width) // 2; a side shorter than the crop is zero-padded first, ceil of half before."""
    h, w = image.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return image[top : top + height, left : left + width]
    new_h, new_w = max(height, h), max(width, w)
    pad_top, pad_left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    padded = np.zeros((new_h, new_w, *image.shape[2:]), image.dtype)
    padded[pad_top : pad_top + h, pad_left : pad_left + w] = image
    top, left = top + pad_top, left + pad_left
    return padded[max(0, top) : min(new_h, top + height), max(0, left) : min(new_w, left + width)]


def preprocess_images(
    images: np.ndarray | Sequence[np.ndarray],
    size: int = 224,
    *,
    crop_size: tuple[int, int] | None = None,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
    rescale_factor: float = 1 / 255,
    resample: int = PIL_BICUBIC,
) -> np.ndarray:
    """CLIP's image preprocessing, equal to transformers' PIL `CLIPImageProcessor`.

    Args:
      images: uint8[N, H, W, 3], or a sequence of uint8[H, W, 3] of differing sizes (RGB).
      size: the shortest side after resizing; crop_size: (height, width) of the center crop,
        (size, size) by default. The other options are those of `ImagePreprocessing`.
    Returns:
      float32[N, crop_height, crop_width, 3]: the `pixel_values` of the vision tower (NHWC).
    """
    from PIL import Image  # here: only CLIP evaluation needs PIL

    crop_h, crop_w = crop_size or (size, size)
    mean = np.asarray(image_mean, np.float32)
    std = np.asarray(image_std, np.float32)
    out = np.empty((len(images), crop_h, crop_w, 3), np.float32)
    for i, image in enumerate(images):
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(
                f"image {i}: expected uint8[H, W, 3] (RGB), got {image.dtype}{list(image.shape)}"
            )
        new_h, new_w = _shortest_side_size(*image.shape[:2], size)
        resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=resample))
        cropped = _center_crop(resized, crop_h, crop_w)
        # transformers `rescale`: multiply in float64, then float32; `normalize` in float32.
        rescaled = (cropped.astype(np.float64) * rescale_factor).astype(np.float32)
        out[i] = (rescaled - mean) / std
    return out


# ---------------------------------------------------------------- the model
@dataclasses.dataclass
class CLIPModelBundle:
    """A loaded transformers `CLIPModel`: both towers with projections, tokenizer, preprocessing.

    text / vision: the towers; their outputs' `text_embeds` / `image_embeds` are transformers'
      `get_text_features` / `get_image_features` (unnormalized).
    text_params / vision_params: Flax variables `{"params": ...}` (float32).
    tokenizer: `ldm_jax.data.tokenizers.CLIPTokenizer`, texts -> int32[B, 77] (padded; the
      causal text tower makes padding after the end-of-text token irrelevant to the embeddings).
    logit_scale: the checkpoint's `logit_scale` parameter, a log: CLIP logits are
      exp(logit_scale) * cosine similarity (exp = 100.0 for OpenAI's CLIP).
    preprocessing: from `preprocessor_config.json`, else CLIP's defaults at the tower's size.
    """

    text: CLIPTextTransformer
    text_params: Any
    vision: CLIPVisionTransformer
    vision_params: Any
    tokenizer: Any
    logit_scale: float
    preprocessing: ImagePreprocessing = ImagePreprocessing()
    config: dict = dataclasses.field(default_factory=dict)
    source: str = ""

    def preprocess(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """uint8 RGB images -> float32[N, crop, crop, 3] pixel_values (`preprocess_images`)."""
        return preprocess_images(images, **dataclasses.asdict(self.preprocessing))


def _rename(key: str) -> str | None:
    """Checkpoint key -> our key under the tower ("text." / "vision."), None for buffers."""
    if key.endswith("embeddings.position_ids"):
        return None
    for prefix, tower, inner in _PREFIXES:
        if key.startswith(prefix):
            return f"{tower}.{inner}{key.removeprefix(prefix)}"
    return key  # logit_scale, or an unexpected key that the strict conversion reports


def _export_name(key: str) -> str:
    """Inverse of `_rename`, so that missing keys read like the checkpoint's other keys."""
    for prefix, tower, inner in reversed(_PREFIXES):  # projections before the bare prefixes
        if key.startswith(f"{tower}.{inner}"):
            return prefix + key.removeprefix(f"{tower}.{inner}")
    return key


def convert_clip_model_state_dict(
    text: CLIPTextTransformer,
    vision: CLIPVisionTransformer,
    state_dict: Mapping[str, np.ndarray],
) -> tuple[dict, dict, float]:
    """A `CLIPModel` state dict -> (text variables, vision variables, logit_scale), strictly.

    Both towers need `projection_dim` set (a `CLIPModel` always has both projections). Raises
    CheckpointError naming every missing, unexpected and mis-shaped key."""
    if text.projection_dim is None or vision.projection_dim is None:
        raise ValueError(
            "a CLIPModel has text_projection and visual_projection: set projection_dim"
        )
    key = jax.random.key(0)
    size = vision.image_size
    abstract = {
        "text": jax.eval_shape(lambda: text.init(key, jnp.zeros((1, 1), jnp.int32)))["params"],
        "vision": jax.eval_shape(lambda: vision.init(key, jnp.zeros((1, size, size, 3))))["params"],
        "logit_scale": jax.ShapeDtypeStruct((), jnp.float32),
    }
    params = state_dict_to_params(
        state_dict, abstract, component="clip_model", rename=_rename, export_name=_export_name
    )
    logit_scale = float(params["logit_scale"])
    return {"params": params["text"]}, {"params": params["vision"]}, logit_scale


def load_clip_model(
    folder, *, tokenizer_dir=None, variant: str | None = None, **overrides
) -> CLIPModelBundle:
    """Load a transformers `CLIPModel` folder (config.json, weights, tokenizer files and
    optionally preprocessor_config.json), e.g. openai/clip-vit-large-patch14 on disk.

    Args:
      folder: the model folder.
      tokenizer_dir: a tokenizer folder to use instead of the model folder's own.
      variant: weights variant ("fp16" -> `model.fp16.safetensors`), upcast to float32.
      overrides: module field overrides for both towers (`dtype`, `attention_implementation`).
    Raises:
      FileNotFoundError (no folder, no config.json, no tokenizer files), UnsupportedConfigError
      (not a CLIPModel config, or an option ldm_jax lacks), CheckpointError (weights that do not
      fit the config).
    """
    from ldm_jax.data.tokenizers import CLIPTokenizer

    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no CLIP model folder {folder}")
    config = _read_json(folder / "config.json", required=True)
    text_fields, vision_fields = cfg.clip_model_fields(config)
    text = CLIPTextTransformer(**{**text_fields, **overrides})
    vision = CLIPVisionTransformer(**{**vision_fields, **overrides})
    preprocessor = _read_json(folder / "preprocessor_config.json", required=False)
    if preprocessor is None:
        size = vision.image_size
        preprocessing = ImagePreprocessing(size=size, crop_size=(size, size))
    else:
        preprocessing = ImagePreprocessing.from_config(preprocessor)
    if preprocessing.crop_size != (vision.image_size, vision.image_size):
        raise cfg.UnsupportedConfigError(
            f"{folder}: preprocessor_config.json crops {preprocessing.crop_size}, but the vision "
            f"tower takes {vision.image_size}x{vision.image_size} images"
        )
    # Before the weights, which take seconds for ViT-L/14: a missing tokenizer fails fast.
    tokenizer = CLIPTokenizer(tokenizer_dir or folder, context_length=text.max_position_embeddings)
    state_dict = read_state_dict(find_weights(folder, variant))
    text_params, vision_params, logit_scale = convert_clip_model_state_dict(
        text, vision, state_dict
    )
    return CLIPModelBundle(
        text=text,
        text_params=text_params,
        vision=vision,
        vision_params=vision_params,
        tokenizer=tokenizer,
        logit_scale=logit_scale,
        preprocessing=preprocessing,
        config=config,
        source=str(folder),
    )


def _read_json(path: pathlib.Path, required: bool) -> dict | None:
    if not path.is_file():
        if not required:
            return None
        raise FileNotFoundError(
            f"{path.parent} has no {path.name}: a transformers CLIPModel folder holds config.json, "
            "model.safetensors (or pytorch_model.bin), the tokenizer files and "
            "preprocessor_config.json"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
