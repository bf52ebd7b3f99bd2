"""Image files and conversions shared by the trainers, the pipeline, the CLI and evaluation:
PNG grids out, pictures in (PIL reads and resizes them, as diffusers' VaeImageProcessor)."""

from __future__ import annotations

import math
import pathlib

import numpy as np


def to_model_range(images_uint8) -> np.ndarray:
    """uint8[..., 3] in [0, 255] -> float32 in [-1, 1] (the VAE's input range)."""
    return np.asarray(images_uint8, np.float32) / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
    """float in [-1, 1] -> uint8 in [0, 255], rounding to nearest."""
    x = (np.asarray(images, np.float32) + 1.0) * 127.5
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8[N,H,W,3] -> one uint8 image with the N images in rows of `ncols`."""
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = img
    return grid


def save_png(image: np.ndarray, path: pathlib.Path, scale: int = 1) -> pathlib.Path:
    from PIL import Image

    pil = Image.fromarray(image)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path)
    return path


def load_image(image, height: int, width: int, grayscale: bool = False) -> np.ndarray:
    """A PIL image, a path, or an array (uint8 [H,W,C] or float [H,W,C] in [0, 1]) ->
    float32[height, width, C] in [0, 1], resized with Lanczos as diffusers' VaeImageProcessor."""
    from PIL import Image

    if isinstance(image, str | pathlib.Path):
        try:
            with Image.open(image) as opened:
                opened.load()  # a truncated or corrupt file raises here, with its name below
                image = opened.copy()
        except (OSError, SyntaxError) as e:  # PIL's errors for unreadable files
            raise ValueError(f"cannot read image {image}: {e}") from e
    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3:
            raise ValueError(f"an image must be [H, W] or [H, W, C], got shape {array.shape}")
        if array.dtype != np.uint8:
            if array.min() < 0 or array.max() > 1:
                raise ValueError("float images must lie in [0, 1]")
            array = np.round(array * 255).astype(np.uint8)
        image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    image = image.convert("L" if grayscale else "RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    out = np.asarray(image, np.float32) / 255.0
    return out[..., None] if grayscale else out


def images_per_prompt(
    images, num_prompts: int, height: int, width: int, grayscale=False, per: str = "prompt"
):
    """One image for all prompts or one per prompt -> float32[num_prompts, H, W, C] in [0, 1];
    `per` names what the count is of, in the error for a wrong count ("prompt", "image")."""
    if isinstance(images, list | tuple):
        loaded = [load_image(im, height, width, grayscale) for im in images]
    elif hasattr(images, "shape") and np.ndim(images) == 4:  # numpy or jax array
        loaded = [load_image(im, height, width, grayscale) for im in np.asarray(images)]
    else:
        loaded = [load_image(images, height, width, grayscale)]
    if len(loaded) == 1:
        loaded = loaded * num_prompts
    if len(loaded) != num_prompts:
        raise ValueError(f"give one image or one per {per} ({num_prompts}), got {len(loaded)}")
    return np.stack(loaded)
