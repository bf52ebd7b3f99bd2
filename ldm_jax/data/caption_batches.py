"""What a fine-tuning step reads (`ldm_jax.train.objectives.finetune`): examples by step, as
`StepIndexedBatches` make them (a pure function of (seed, step)), with

- images: center crops as prepared, or (`data.random_crop`) a random crop of each stored
  uncropped image, drawn per (seed, step, example);
- or their VAE posteriors, precomputed once by `encode_dataset` (`ldm-jax encode` with a
  finetune config) and read through `data.precomputed_latents_dir`, checked against the run;
- captions as token ids of each of the checkpoint's tokenizers;
- SDXL's size conditioning (`original_size`, `crop_top_left`).
"""

from __future__ import annotations

import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.data import latents as latents_lib
from ldm_jax.data.pipeline import SIZE_COLUMNS, StepIndexedBatches, load_dataset
from ldm_jax.data.tokenizers import token_ids
from ldm_jax.runs import params_fingerprint

log = logging.getLogger("ldm_jax")


def random_crops(images, size: int, seed: int, step: int, indices) -> tuple:
    """torchvision's `RandomCrop(size)` of each image: (uint8[B, size, size, 3], corners
    int32[B, 2] (top, left), resized widths int32[B]). images: B arrays uint8[h, w, 3] with
    h, w >= size. The corner of example i is drawn from `default_rng([seed, step, i])`, so a
    batch is a function of (seed, step) (a resumed run crops as an uninterrupted one) and of
    the example, not of how many processes share the batch."""
    crops, corners, widths = [], [], []
    for image, index in zip(images, np.asarray(indices).reshape(-1), strict=True):
        h, w = image.shape[:2]
        if min(h, w) < size:
            raise ValueError(f"an image of {h}x{w} pixels has no {size}x{size} crop")
        rng = np.random.default_rng([seed, step, int(index)])
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        crops.append(image[top : top + size, left : left + size])
        corners.append((top, left))
        widths.append(w)
    return np.stack(crops), np.asarray(corners, np.int32), np.asarray(widths, np.int32)


class CaptionBatches:
    """batches[step] -> the examples of `step` (StepIndexedBatches) with captions as token ids:
    {"image": uint8[B, H, W, 3], "input_ids": (int32[B, L], ...) one per tokenizer, and for SDXL
    "original_size", "crop_top_left": int32[B, 2]}. With `crop_size`, images are uncropped and
    each is cut to a random crop (`random_crops`); SDXL's batches then also carry
    "crop_top_left_flipped", the corner of the same crop in the mirrored image."""

    def __init__(self, examples: StepIndexedBatches, tokenizers, crop_size: int | None = None):
        self.examples, self.tokenizers = examples, tuple(tokenizers)
        self.crop_size = crop_size
        # What checkpoints record as the data position (checkpointing.data_position).
        self.seed = examples.seed
        self.global_batch_size = examples.global_batch_size
        self.num_examples = examples.num_examples

    def __getitem__(self, step: int) -> dict:
        batch = dict(self.examples[step])
        captions = batch.pop("caption")
        batch["input_ids"] = tuple(token_ids(t, captions) for t in self.tokenizers)
        if self.crop_size:
            size, indices = self.crop_size, self.examples.indices(step)
            batch["image"], corners, widths = random_crops(
                batch["image"], size, self.seed, step, indices
            )
            if "crop_top_left" in batch:
                batch["crop_top_left"] = corners
                mirrored = np.stack([corners[:, 0], widths - corners[:, 1] - size], axis=1)
                batch["crop_top_left_flipped"] = mirrored.astype(np.int32)
        return batch


def make_batches(config, model) -> CaptionBatches:
    """The training examples by step: images (or their precomputed posteriors), captions, and
    for SDXL the size conditioning."""
    random_crop = bool(config.data.get("random_crop", False))
    if config.data.get("precomputed_latents_dir"):
        if random_crop:
            raise ValueError(
                "data.random_crop cuts a new crop every step, so its latents cannot be "
                "precomputed: leave data.precomputed_latents_dir empty, or data.random_crop False"
            )
        arrays = precomputed_arrays(config, model)
    else:
        data = load_dataset(config, "train", crop="none" if random_crop else "center")
        arrays = {"image": data["image"], "caption": data["caption"]}
        if model.kind == "sdxl":
            arrays.update(size_conditioning(config, data))
    examples = StepIndexedBatches(arrays, config.batch_size, config.seed)
    log.info("%s: %d examples", config.data.name, examples.num_examples)
    crop_size = config.data.image_size if random_crop else None
    return CaptionBatches(examples, model.get_tokenizers(), crop_size)


def size_conditioning(config, data) -> dict:
    """SDXL's `original_size` and `crop_top_left` (int32[N, 2]) of a dataset: its own columns
    (the image_caption builder records them), else those of an uncropped image."""
    if all(k in data for k in SIZE_COLUMNS):
        return {k: data[k] for k in SIZE_COLUMNS}
    n, size = len(data["image"]), config.data.image_size
    log.warning(
        "%s records no original image sizes: SDXL's original_size is taken to be the training "
        "size, crop_top_left (0, 0)",
        config.data.name,
    )
    return {
        "original_size": np.full((n, 2), size, np.int32),
        "crop_top_left": np.zeros((n, 2), np.int32),
    }


# --- Precomputed latents -------------------------------------------------------------------------

ENCODE_HINT = (
    "ldm-jax encode --config <the finetune config> --config.pretrained=... --config.data.path=..."
)


def encode_dataset(
    config, load_model, out_dir, *, batch_size: int = 16, keep_arrays: bool = False
) -> dict:
    """The train split of `config.data` encoded once with the VAE of `config.pretrained`
    (`load_model(config)`, the fine-tuning stage's loader), written to `out_dir` for
    `data.precomputed_latents_dir`; returns the meta also in out_dir/meta.json.

    Columns: latent_mean, latent_std f32[N, h, w, c] (the posterior of each image, pixels in
    [-1, 1] as in the step), with `data.random_flip` also latent_mean_flipped, latent_std_flipped
    (of the mirror image), caption (text) and, for SDXL, original_size and crop_top_left.
    """
    if config.data.get("random_crop", False):
        raise ValueError(
            "data.random_crop cuts a new crop every step: there is no one latent per image to "
            "store; encode with data.random_crop=False (center crops)"
        )
    out_dir = latents_lib.check_new_output(out_dir)
    model = load_model(config)
    data = load_dataset(config, "train")
    n, vae = len(data["image"]), model.vae
    side = config.data.image_size // model.vae_scale_factor
    shape, flips = (side, side, vae.latent_channels), bool(config.data.random_flip)
    encode_fn = jax.jit(
        lambda p, x: vae.apply(p, x.astype(jnp.float32) / 127.5 - 1.0, method=vae.encode)
    )
    columns = {"latent_mean": (shape, "float32"), "latent_std": (shape, "float32")}
    if flips:
        columns |= {
            "latent_mean_flipped": (shape, "float32"),
            "latent_std_flipped": (shape, "float32"),
        }
    columns["caption"] = ((), "string")
    sizes = size_conditioning(config, data) if model.kind == "sdxl" else {}
    columns |= {k: ((2,), "int32") for k in sizes}
    out = latents_lib.open_arrays(out_dir / "arrays", n, columns)
    for start, stop, images in latents_lib.padded_batches(data["image"], batch_size):
        for suffix, x in (("", images), ("_flipped", images[:, :, ::-1]))[: 1 + flips]:
            posterior = encode_fn(model.vae_params, x)
            out["latent_mean" + suffix][start:stop] = np.asarray(posterior.mean)[: stop - start]
            out["latent_std" + suffix][start:stop] = np.asarray(posterior.std)[: stop - start]
        out["caption"][start:stop] = [str(c) for c in data["caption"][start:stop]]
        for key, values in sizes.items():
            out[key][start:stop] = np.asarray(values[start:stop])
        log.info("encoded %d / %d examples", stop, n)
    meta = {
        "stage": "finetune",
        "num_examples": n,
        "split": "train",
        "kind": model.kind,
        "latent_shape": list(shape),
        "image_size": int(config.data.image_size),
        "random_flip": flips,
        "dataset": {
            k: v for k, v in config.data.to_dict().items() if k != "precomputed_latents_dir"
        },
        "pretrained": str(pathlib.Path(config.pretrained).absolute()),
        "variant": config.variant,
        "vae_fingerprint": params_fingerprint(model.vae_params),
        "text": "captions as text: the step tokenizes and encodes them with the frozen encoders",
    }
    latents_lib.finish(out_dir, meta, out, keep_arrays=keep_arrays)
    log.info("wrote %d precomputed latents %s to %s", n, shape, out_dir)
    return meta


def precomputed_arrays(config, model) -> dict:
    """The columns of `data.precomputed_latents_dir` that this run reads, after checking that
    they were encoded for it: the finetune stage, this checkpoint's VAE, this image size, and
    mirror images if the run flips."""
    path = config.data.precomputed_latents_dir
    meta, table = latents_lib.open_table(path, ENCODE_HINT)
    if meta.get("stage", "ldm") != "finetune":
        raise ValueError(
            f"the latents in {path} were written for the {meta.get('stage', 'ldm')} stage (its "
            f"VAE and columns); encode this dataset with `{ENCODE_HINT}`"
        )
    fingerprint = params_fingerprint(model.vae_params)
    problems = []
    if meta["vae_fingerprint"] != fingerprint:
        problems.append(
            f"another VAE (of {meta['pretrained']}, fingerprint {meta['vae_fingerprint']}; "
            f"this checkpoint's is {fingerprint})"
        )
    if meta["image_size"] != config.data.image_size:
        problems.append(f"image_size {meta['image_size']}, not {config.data.image_size}")
    if config.data.random_flip and not meta["random_flip"]:
        problems.append("no mirror images, and this run has data.random_flip=True")
    if model.kind == "sdxl" and not all(k in table.columns for k in SIZE_COLUMNS):
        problems.append("no SDXL size conditioning (encoded for an SD 1.x / 2.x checkpoint)")
    if problems:
        raise ValueError(
            f"the latents in {path} do not fit this run: {'; '.join(problems)}. Encode again "
            f"with this config (`{ENCODE_HINT}`)"
        )
    columns = ["latent_mean", "latent_std", "caption"]
    if config.data.random_flip:
        columns += ["latent_mean_flipped", "latent_std_flipped"]
    if model.kind == "sdxl":
        columns += list(SIZE_COLUMNS)
    encoded = meta.get("dataset", {})
    if (encoded.get("name"), encoded.get("path")) != (config.data.name, config.data.get("path")):
        # The latents replace the dataset: a changed data.path would otherwise go unnoticed.
        log.warning(
            "the latents in %s were encoded from %s %s; this config names %s %s, which is not "
            "read (the latents are)",
            path,
            encoded.get("name"),
            encoded.get("path"),
            config.data.name,
            config.data.get("path"),
        )
    log.info("reading precomputed latents %s from %s", meta["latent_shape"], path)
    if config.data.get("in_memory", False):
        data = table.to_numpy()
        return {c: data[c] for c in columns}
    return {c: table[c] for c in columns}
