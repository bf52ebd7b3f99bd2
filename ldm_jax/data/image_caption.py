"""A user's own image-caption collection as a TFDS dataset, prepared offline.

Two source layouts (`path` below):

- a folder (searched recursively) of images, each with a caption file of the same name:
  `cat.jpg` + `cat.txt`, `sub/dog.png` + `sub/dog.txt`;
- a `.csv` (or `.parquet`, when pyarrow is installed) with an image-path column and a caption
  column; relative image paths are relative to the table's folder.

Every image is decoded with PIL (EXIF rotation applied, converted to RGB), resized so its shorter
side is `resolution` and center-cropped to `resolution` x `resolution` -- the `Resize` +
`CenterCrop` of diffusers' `examples/text_to_image/train_text_to_image.py`. With `crop="none"`
images are only resized, for a trainer that cuts a random crop every step. Each example also
keeps the source's (height, width) and the crop's top-left corner (`original_size`,
`crop_top_left`: SDXL's micro-conditioning). Images that cannot be read or decoded, and images without a caption,
are skipped and counted: the counts (and the first few file names) are in the prepared dataset's
`info.metadata["skipped"]`, and a warning with the count is logged when preparing and when
loading.

  builder = make_builder("/data/my_photos", resolution=256, data_dir="~/tensorflow_datasets")
  builder.download_and_prepare()  # or `prepare(...)`, which also logs the skipped count
  ds = builder.as_data_source("train")  # ds[i] -> {"image": uint8[256, 256, 3], "caption": ...}

The TFDS builder config is named `<resolution>px-<fingerprint>`, the fingerprint covering the
source's absolute path, its file names, sizes and modification times, and the column names: a
changed collection prepares a new copy next to the old one in `data_dir/image_caption/`. The
single split is `train`.

Imports tensorflow_datasets: neither `ldm_jax` nor `ldm_jax.data` imports this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib
from typing import ClassVar

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np
import tensorflow_datasets as tfds

log = logging.getLogger("ldm_jax")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Column names tried, in order, when the config leaves `image_column` / `caption_column` empty.
IMAGE_COLUMNS = ("image", "image_path", "file_name", "filename", "path", "file")
CAPTION_COLUMNS = ("caption", "text", "prompt")
MAX_LISTED_SKIPPED = 20  # file names kept in the metadata; the counts are always complete
CROPS = ("center", "none")


def resize_and_center_crop(image: np.ndarray, size: int, crop: bool = True) -> np.ndarray:
    """uint8[H, W, 3] -> uint8[size, size, 3]: shorter side to `size` (bilinear), center crop.

    Matches torchvision's `Resize(size)` + `CenterCrop(size)` on PIL images (the preprocessing
    of diffusers' text-to-image fine-tuning example): the longer side becomes
    `int(size * long / short)`, and the crop's top-left corner is `round((H - size) / 2)`.
    crop=False: the resized image, uint8[new_h, new_w, 3] (random crops are cut per step).
    """
    from PIL import Image

    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an image of shape [H, W, 3], got {image.shape}")
    h, w = image.shape[:2]
    new_h, new_w, top, left = center_crop_box(h, w, size)
    pil = Image.fromarray(np.asarray(image, np.uint8))
    if (new_h, new_w) != (h, w):
        pil = pil.resize((new_w, new_h), Image.BILINEAR)
    if crop and (new_h, new_w) != (size, size):
        pil = pil.crop((left, top, left + size, top + size))
    return np.asarray(pil, np.uint8)


def center_crop_box(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """(resized height, resized width, crop top, crop left) of `resize_and_center_crop`.

    The crop corner is in resized-image pixels: SDXL's `crop_top_left` micro-conditioning
    (Podell et al. 2023, Sec. 2.2; diffusers' `train_text_to_image_sdxl.py` with --center_crop).
    """
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    return new_h, new_w, int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))


def read_image(path: str | os.PathLike, size: int, crop: bool = True) -> np.ndarray:
    """An image file -> uint8[size, size, 3] (crop=False: shorter side `size`); raises
    OSError/ValueError if it cannot be read."""
    return read_image_and_size(path, size, crop)[0]


def read_image_and_size(
    path: str | os.PathLike, size: int, crop: bool = True
) -> tuple[np.ndarray, tuple[int, int]]:
    """An image file -> (uint8[size, size, 3], its (height, width) before resizing); crop=False
    leaves the resized image uncropped."""
    from PIL import Image, ImageOps

    with Image.open(path) as pil:
        pil.load()  # decode now: a truncated or corrupt file raises here, not later
        pil = ImageOps.exif_transpose(pil).convert("RGB")  # as diffusers: .convert("RGB")
        pixels = np.asarray(pil)
        return resize_and_center_crop(pixels, size, crop), pixels.shape[:2]


@dataclasses.dataclass
class ImageCaptionConfig(tfds.core.BuilderConfig):
    """path: the folder or table; resolution: output pixels per side; the columns of a table."""

    path: str = ""
    resolution: int = 256
    image_column: str = ""
    caption_column: str = ""
    # "center": stored center-cropped to resolution x resolution; "none": stored resized (shorter
    # side = resolution) and uncropped, for trainers that cut a random crop every step.
    crop: str = "center"


def _table_rows(path: pathlib.Path, image_column: str, caption_column: str):
    """(image path, caption) pairs from a .csv or .parquet table, in table order."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(
                f"reading {path} needs pyarrow (`pip install pyarrow`); or give a .csv instead"
            ) from None
        columns = pq.read_table(path).to_pydict()
    else:
        import csv

        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        names = list(rows[0].keys()) if rows else []
        columns = {name: [row[name] for row in rows] for name in names}

    def pick(wanted: str, candidates: tuple[str, ...], what: str) -> str:
        options = (wanted,) if wanted else candidates
        for name in options:
            if name in columns:
                return name
        raise ValueError(
            f"{path}: no {what} column (looked for {', '.join(options)}; the table has "
            f"{', '.join(columns) or 'no columns'}); set image_column / caption_column"
        )

    image_key = pick(image_column, IMAGE_COLUMNS, "image-path")
    caption_key = pick(caption_column, CAPTION_COLUMNS, "caption")
    for file, caption in zip(columns[image_key], columns[caption_key]):
        image_path = pathlib.Path(str(file)).expanduser()
        if not image_path.is_absolute():
            image_path = path.parent / image_path
        yield image_path, caption


def _folder_images(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


def fingerprint(path: str | os.PathLike, image_column: str = "", caption_column: str = "") -> str:
    """10 hex digits identifying the source: absolute path, its files' names, sizes, mtimes."""
    root = pathlib.Path(path).expanduser().resolve()
    if not root.exists():
        raise FileNotFoundError(
            f"image-caption source {root} does not exist (expected a folder of images with "
            "same-named .txt captions, or a .csv / .parquet of image paths and captions)"
        )
    if root.is_file():
        files = [root]
    else:  # only what the builder reads: a data_dir inside the folder must not change this
        kept = (*IMAGE_EXTENSIONS, ".txt")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in kept and p.is_file())
    digest = hashlib.sha256(f"{root}\0{image_column}\0{caption_column}".encode())
    for file in files:
        stat = file.stat()
        digest.update(
            f"{file.relative_to(root.parent)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode()
        )
    return digest.hexdigest()[:10]


class ImageCaption(tfds.core.GeneratorBasedBuilder):
    """Images with captions from a local folder or table; see the module docstring."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Initial release.",
        "1.1.0": "original_size and crop_top_left of every image (SDXL micro-conditioning).",
    }

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.resolution
        shape = (size, size, 3) if self.builder_config.crop == "center" else (None, None, 3)
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=shape),
                    "caption": tfds.features.Text(),
                    "file_name": tfds.features.Text(),  # relative to the source folder/table
                    # (height, width) of the source image, and the (top, left) corner of the
                    # center crop in the resized image: SDXL's size and crop conditioning
                    # ((0, 0) for uncropped images: the trainer's random crop sets it).
                    "original_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                    "crop_top_left": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                }
            ),
            supervised_keys=("caption", "image"),
            # Source order (sorted file names, or table rows): easy to check against the files.
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the source is local.
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        config = self.builder_config
        root = pathlib.Path(config.path).expanduser().resolve()
        if root.is_file():
            if root.suffix not in (".csv", ".parquet"):
                raise ValueError(f"{root}: a table must be a .csv or .parquet file")
            rows = _table_rows(root, config.image_column, config.caption_column)
            base = root.parent
        else:
            rows = ((p, None) for p in _folder_images(root))
            base = root
        skipped = {"unreadable": 0, "no_caption": 0, "files": []}
        kept = 0
        for index, (image_path, caption) in enumerate(rows):
            name = os.path.relpath(image_path, base)
            if caption is None:  # folder layout: the caption is in <name>.txt
                caption_file = image_path.with_suffix(".txt")
                caption = caption_file.read_text("utf-8").strip() if caption_file.exists() else None
            if caption is None or (isinstance(caption, float) and np.isnan(caption)):
                skipped["no_caption"] += 1
                if len(skipped["files"]) < MAX_LISTED_SKIPPED:
                    skipped["files"].append(f"{name}: no caption")
                continue
            try:
                center = config.crop == "center"
                image, (h, w) = read_image_and_size(image_path, config.resolution, center)
            except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for bad files
                skipped["unreadable"] += 1
                if len(skipped["files"]) < MAX_LISTED_SKIPPED:
                    skipped["files"].append(f"{name}: {type(e).__name__}: {e}")
                continue
            kept += 1
            top, left = center_crop_box(h, w, config.resolution)[2:] if center else (0, 0)
            example = {
                "image": image,
                "caption": str(caption).strip(),
                "file_name": name,
                "original_size": np.asarray([h, w], np.int32),
                "crop_top_left": np.asarray([top, left], np.int32),
            }
            yield index, example  # the row index: unique even when a table names a file twice
        # Stored with the dataset info (dataset_info's metadata.json) when preparing ends.
        self.info.metadata["skipped"] = skipped
        self.info.metadata["num_examples"] = kept
        if kept == 0:
            raise ValueError(
                f"no usable image-caption pairs in {root} (skipped {skipped['unreadable']} "
                f"unreadable images and {skipped['no_caption']} without a caption)"
            )


def log_skipped(metadata, source) -> None:
    skipped = metadata.get("skipped", {})
    count = skipped.get("unreadable", 0) + skipped.get("no_caption", 0)
    if count:
        log.warning(
            "image_caption %s: skipped %d file(s) (%d unreadable images, %d without a caption), "
            "e.g. %s",
            source,
            count,
            skipped.get("unreadable", 0),
            skipped.get("no_caption", 0),
            "; ".join(skipped.get("files", [])[:3]),
        )


def make_builder(
    path: str | os.PathLike,
    *,
    resolution: int,
    data_dir: str | os.PathLike,
    image_column: str = "",
    caption_column: str = "",
    crop: str = "center",
) -> ImageCaption:
    """The builder of `path` at `resolution`, in `data_dir/image_caption/<config name>/`;
    crop "center" (images resolution x resolution) or "none" (shorter side resolution)."""
    if resolution < 1:
        raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
    if crop not in CROPS:
        raise ValueError(f"unknown crop {crop!r}; valid: {', '.join(CROPS)}")
    fp = fingerprint(path, image_column, caption_column)
    config = ImageCaptionConfig(
        name=f"{resolution}px-{fp}" if crop == "center" else f"{resolution}px-uncropped-{fp}",
        description=f"{pathlib.Path(path).expanduser().resolve()} at {resolution}x{resolution}"
        + ("" if crop == "center" else " (shorter side, uncropped)"),
        path=os.fspath(pathlib.Path(path).expanduser().resolve()),
        resolution=resolution,
        image_column=image_column,
        caption_column=caption_column,
        crop=crop,
    )
    logging.getLogger("absl").setLevel(logging.ERROR)  # "Using custom data configuration"
    return ImageCaption(config=config, data_dir=os.path.expanduser(os.fspath(data_dir)))


def prepare(builder: ImageCaption, file_format: str = "array_record") -> dict:
    """Prepares the dataset if needed (array_record: random access) and returns its metadata."""
    builder.download_and_prepare(
        file_format=file_format,
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
    metadata = dict(builder.info.metadata or {})
    log_skipped(metadata, builder.builder_config.path)
    return metadata
