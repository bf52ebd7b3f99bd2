"""CLIP score: how well images match their captions, by a pretrained CLIP (Hessel et al. 2021).

CLIP-S(image, caption) = w * max(cos(E_image, E_caption), 0) with CLIP's projected embeddings.
Hessel et al. take w = 2.5; text-to-image papers (and torchmetrics' `CLIPScore`) report w = 100,
which is what `clip_score` returns. With FID it gives the two axes of the usual guidance-scale
sweep: FID for image quality and diversity, CLIP score for prompt following. The standard model
is OpenAI's ViT-L/14 (`openai/clip-vit-large-patch14` as a transformers folder on disk, loaded by
`ldm_jax.convert.load_clip_model`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SCALE = 100.0  # torchmetrics' CLIPScore and the text-to-image literature (Hessel et al.: 2.5)


class ClipScorer:
    """Jit-compiled CLIP embeddings of a `CLIPModelBundle`: `scores(images, prompts)` ->
    float64[N], one CLIP score per (image, prompt) pair."""

    def __init__(self, bundle, *, batch_size: int = 64):
        import jax

        self.bundle = bundle
        self.batch_size = batch_size
        self._image = jax.jit(lambda p, x: bundle.vision.apply(p, x).image_embeds)
        self._text = jax.jit(lambda p, ids: bundle.text.apply(p, ids).text_embeds)

    @classmethod
    def from_folder(cls, folder, **kwargs) -> ClipScorer:
        from ldm_jax.convert import load_clip_model

        return cls(load_clip_model(folder), **kwargs)

    def _batched(self, fn, params, inputs: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start : start + self.batch_size]
            pad = self.batch_size - len(chunk)  # one compiled shape for every batch
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            out.append(np.asarray(fn(params, padded), np.float64)[: len(chunk)])
        return np.concatenate(out)

    def image_embeddings(self, images) -> np.ndarray:
        """uint8 RGB images (an array [N, H, W, 3] or a list of differing sizes) -> unit
        float64[N, projection_dim]."""
        pixels = self.bundle.preprocess(images)
        return _normalize(self._batched(self._image, self.bundle.vision_params, pixels))

    def text_embeddings(self, prompts: Sequence[str]) -> np.ndarray:
        ids = self.bundle.tokenizer(list(prompts))
        return _normalize(self._batched(self._text, self.bundle.text_params, ids))

    def cosine_similarities(self, images, prompts: Sequence[str]) -> np.ndarray:
        """float64[N]: cos(E_image_i, E_prompt_i)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if not len(prompts):
            raise ValueError("no images to score")
        return np.sum(self.image_embeddings(images) * self.text_embeddings(prompts), axis=-1)

    def scores(self, images, prompts: Sequence[str]) -> np.ndarray:
        """float64[N]: SCALE * max(cos, 0) per (image, prompt) pair."""
        return SCALE * np.maximum(self.cosine_similarities(images, prompts), 0.0)


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def summarize(scores: np.ndarray) -> dict:
    """{"clip_score": mean, "clip_score_std": std (ddof=1, of the per-image scores)}."""
    scores = np.asarray(scores, np.float64)
    std = float(scores.std(ddof=1)) if len(scores) > 1 else 0.0
    return {"clip_score": float(scores.mean()), "clip_score_std": std}
