"""Image conversions and grids shared by the trainers, the sampler CLI and evaluation."""

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
