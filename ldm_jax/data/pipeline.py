"""Datasets for the trainers, and batches that are a pure function of (seed, step).

The batch for step s is a pure function of (seed, s): epoch e = s*B // N uses the permutation
`default_rng([seed, e])`. A resumed run therefore sees exactly the batches an uninterrupted run
would have seen, with no iterator state to checkpoint. Each process takes its own contiguous slice
of the global batch (multi-host data loading), and reads only the examples in that slice.

`load_dataset(config, split)` returns the split named by `config.data.name`:

- `shapes`: the embedded procedural dataset (`shapes_tfds`), in memory.
- `image_caption`: a local folder / table of images and captions (`image_caption`), read from
  `config.data.path`.
- `cifar10`, `imagenet2012`, `coco_captions`: public TFDS datasets. Captions of the classification
  sets come from the class names through `config.data.caption_template` ("a photo of a cat");
  COCO uses the first of each image's human captions. `imagenet2012` is prepared from
  `config.data.manual_dir` (ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar).

The non-procedural datasets are prepared in TFDS's `array_record` format, which gives random
access by example index. With `config.data.in_memory` the whole split is decoded once into numpy
arrays; otherwise `load_dataset` returns a `RecordTable` that reads, decodes and resizes only the
examples a batch names. Both index the same stored order with the same permutation, so batches are
the same function of (seed, step) either way and resuming at step s is exact: there is no
iterator to fast-forward (a skip-to-position scheme over a shuffled stream would be exact only if
the stream's shuffle were single-threaded, and would cost O(s) reads).
"""

from __future__ import annotations

import collections.abc
import concurrent.futures
import io
import logging
import os

import jax
import numpy as np

log = logging.getLogger("ldm_jax")

DATASETS = ("shapes", "image_caption", "cifar10", "imagenet2012", "coco_captions")
# The trainers ask for "train" and "test"; each dataset's own split names. A local collection has
# one split: its "test" (the autoencoder's reconstruction preview) shows training images.
SPLITS = {
    "image_caption": {"train": "train", "test": "train"},
    "cifar10": {"train": "train", "test": "test"},
    "imagenet2012": {"train": "train", "test": "validation"},
    # Karpathy & Li's splits: "restval" is the rest of val2014, which image-text work trains on.
    "coco_captions": {"train": "train+restval", "test": "val"},
}
# CIFAR-10's batches.meta.txt (TFDS sets these names only when it prepares the real data).
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
DEFAULT_CAPTION_TEMPLATE = "a photo of {a} {name}"
IMAGENET_MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
DECODE_THREADS = min(8, os.cpu_count() or 1)  # PIL decodes and resizes outside the GIL
# int32[2] columns of `image_caption`: the source (height, width) and the center crop's (top, left).
SIZE_COLUMNS = ("original_size", "crop_top_left")


class StepIndexedBatches:
    """batches[step] -> dict of numpy arrays holding this process's part of the global batch.

    arrays: name -> numpy array, or -> a `RecordTable` column (read lazily); all of one length.
    """

    def __init__(self, arrays: dict, global_batch_size: int, seed: int):
        sizes = {k: len(v) for k, v in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"arrays have different lengths: {sizes}")
        self.arrays = arrays
        self.num_examples = next(iter(sizes.values()))
        if global_batch_size > self.num_examples:
            raise ValueError(
                f"batch_size {global_batch_size} exceeds the dataset's {self.num_examples} examples"
            )
        n_proc = jax.process_count()
        if global_batch_size % n_proc:
            raise ValueError(f"batch_size {global_batch_size} not divisible by {n_proc} processes")
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // n_proc
        self.seed = seed
        self._perm_cache: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {
                epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            }
        return self._perm_cache[epoch]

    def indices(self, step: int) -> np.ndarray:
        """Global example indices of the batch at `step` (drops each epoch's remainder)."""
        per_epoch = self.num_examples // self.global_batch_size
        epoch, pos = divmod(step, per_epoch)
        start = pos * self.global_batch_size + jax.process_index() * self.local_batch_size
        return self._permutation(epoch)[start : start + self.local_batch_size]

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        idx = self.indices(step)
        out, lazy = {}, {}
        for key, values in self.arrays.items():
            if isinstance(values, Column):  # one read per record for all of a table's columns
                lazy.setdefault(id(values.table), (values.table, {}))[1][key] = values.key
            else:
                out[key] = values[idx]
        for table, keys in lazy.values():
            rows = table.take(idx, tuple(set(keys.values())))
            out.update({key: rows[column] for key, column in keys.items()})
        return out


class RecordTable(collections.abc.Mapping):
    """Random access to a TFDS data source: `table.take(indices) -> {column: numpy array}`.

    source: a TFDS `ArrayRecordDataSource` (source[i] -> one stored example, image left encoded);
    convert(example, columns) -> {column: value} decodes, resizes and captions one example.
    `table[column]` is a lazy `Column`, so a trainer can treat the table like a dict of arrays.
    """

    def __init__(self, source, convert, columns: tuple[str, ...]):
        self.source, self.convert, self.columns = source, convert, columns

    def __len__(self) -> int:  # Mapping: the number of columns
        return len(self.columns)

    @property
    def num_examples(self) -> int:
        return len(self.source)

    def __iter__(self):
        return iter(self.columns)

    def __getitem__(self, column: str) -> Column:
        if column not in self.columns:
            raise KeyError(f"no column {column!r}; columns: {', '.join(self.columns)}")
        return Column(self, column)

    def take(self, indices, columns: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Examples at `indices` (int[n]), in that order -> {column: array with leading n}."""
        columns = self.columns if columns is None else columns
        indices = [int(i) for i in np.asarray(indices).reshape(-1)]
        for i in indices:
            if not 0 <= i < len(self.source):
                raise IndexError(f"example {i} out of range for {len(self.source)} examples")

        def one(i):
            return self.convert(self.source[i], columns)

        with concurrent.futures.ThreadPoolExecutor(DECODE_THREADS) as pool:
            rows = list(pool.map(one, indices))  # map keeps the order: deterministic
        return {c: _stack([row[c] for row in rows]) for c in columns}

    def to_numpy(self, chunk: int = 1024) -> dict[str, np.ndarray]:
        """The whole table in memory (stored order)."""
        n = len(self.source)
        parts = [self.take(np.arange(s, min(s + chunk, n))) for s in range(0, n, chunk)]
        return {c: np.concatenate([p[c] for p in parts]) for c in self.columns}


class Column(collections.abc.Sequence):
    """One column of a `RecordTable`: len() and [int | slice | int array], read on demand."""

    def __init__(self, table: RecordTable, key: str):
        self.table, self.key = table, key

    def __len__(self) -> int:
        return self.table.num_examples

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            return self.table.take([idx], (self.key,))[self.key][0]
        if isinstance(idx, slice):
            idx = np.arange(len(self))[idx]
        return self.table.take(idx, (self.key,))[self.key]

    def __iter__(self):
        for start in range(0, len(self), 1024):
            yield from self[start : start + 1024]


def _stack(values: list) -> np.ndarray:
    """One array of the rows; an object array of them when they are strings or differ in shape
    (uncropped images)."""
    if values and (
        isinstance(values[0], str) or any(np.shape(v) != np.shape(values[0]) for v in values)
    ):
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out
    return np.stack(values) if values else np.zeros((0,))


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_image(data: bytes, size: int, crop: bool = True) -> np.ndarray:
    """Encoded image bytes (PNG/JPEG) -> uint8[size, size, 3], resized and center-cropped
    (crop=False: resized to shorter side `size`, uncropped)."""
    from ldm_jax.data import image_caption

    return image_caption.read_image(io.BytesIO(data), size, crop)


def class_caption(template: str, name: str) -> str:
    """`template` with `{name}` and `{a}` ("a" or "an" for `name`): "a photo of {a} {name}"."""
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return template.format(name=name, a=article)


def imagenet_class_names() -> list[str]:
    """1000 readable ImageNet names in TFDS's label order (sorted WordNet ids): 0 -> "tench"."""
    # TFDS ships the standard human-readable list (in label order) with its SI-Score dataset.
    from tensorflow_datasets.datasets.siscore import labels

    names = [entry.split(",")[0].strip() for entry in labels.IMAGENET_LABELS_LIST]
    if len(names) != 1000:
        raise RuntimeError(f"expected 1000 ImageNet class names, found {len(names)}")
    return names


def _converter(name: str, size: int, template: str, crop: str = "center"):
    """convert(example, columns) for one TFDS dataset: image uint8[size,size,3] (crop "none":
    uint8[h, w, 3] with shorter side `size`), caption str."""
    if name == "cifar10":
        names = list(CIFAR10_CLASSES)
    elif name == "imagenet2012":
        names = imagenet_class_names()
    else:
        names = None

    def convert(example, columns):
        out = {}
        if "image" in columns:
            out["image"] = decode_image(example["image"], size, crop == "center")
        if "caption" in columns:
            if names is not None:
                out["caption"] = class_caption(template, names[int(example["label"])])
            elif name == "coco_captions":
                texts = example["captions"]["text"]
                out["caption"] = _text(texts[0]) if len(texts) else ""
            else:
                out["caption"] = _text(example["caption"])
        if "label" in columns:
            out["label"] = np.int32(example["label"])
        for key in SIZE_COLUMNS:  # image_caption: SDXL's size and crop conditioning
            if key in columns:
                out[key] = np.asarray(example[key], np.int32)
        return out

    columns = ("image", "caption", "label") if names is not None else ("image", "caption")
    if name == "image_caption":
        columns += SIZE_COLUMNS
    return convert, columns


def _tfds_source(config, split: str, crop: str = "center"):
    """(builder, data source of `split`) for a dataset stored in array_record format."""
    import tensorflow_datasets as tfds

    data = config.data
    data_dir = os.path.expanduser(data.data_dir)
    download = tfds.download.DownloadConfig(try_download_gcs=False)
    if data.name == "image_caption":
        from ldm_jax.data import image_caption

        if not data.get("path"):
            raise ValueError(
                "config.data.path is empty: point it at a folder of images with same-named .txt "
                "captions, or at a .csv / .parquet of image paths and captions"
            )
        builder = image_caption.make_builder(
            data.path, resolution=data.image_size, data_dir=data_dir, crop=crop
        )
        image_caption.prepare(builder)
    else:
        builder = tfds.builder(data.name, config=data.get("config_name") or None, data_dir=data_dir)
        if data.name == "imagenet2012":
            manual_dir = os.path.expanduser(data.get("manual_dir", ""))
            missing = [
                f for f in IMAGENET_MANUAL_FILES if not os.path.exists(os.path.join(manual_dir, f))
            ]
            if missing and not builder.is_prepared():
                raise FileNotFoundError(
                    f"imagenet2012 is not prepared in {data_dir} and config.data.manual_dir "
                    f"({manual_dir or 'empty'}) lacks {', '.join(missing)}: download them from "
                    "https://image-net.org and set --config.data.manual_dir=<their folder>"
                )
            download = tfds.download.DownloadConfig(try_download_gcs=False, manual_dir=manual_dir)
        builder.download_and_prepare(file_format="array_record", download_config=download)
    try:
        # Images stay encoded here: `convert` decodes them in threads, and only when asked for.
        source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    except NotImplementedError as e:
        raise ValueError(
            f"{data.name} in {data_dir} was prepared as {builder.info.file_format}, but ldm_jax "
            "reads examples by index (batches are a function of (seed, step)), which needs "
            "array_record: prepare it again into another data_dir, or convert it with `tfds "
            f"convert_format --out_file_format=array_record` ({e})"
        ) from None
    return builder, source


def data_config(name: str, image_size: int, **fields) -> dict:
    """The `config.data` section for a TFDS dataset, every field present (unknown keys error).

    name: one of DATASETS; image_size: pixels per side after resize + center crop.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    defaults = dict(
        name=name,
        config_name="",  # TFDS builder config (e.g. "2014" for coco_captions); "" = default
        data_dir="~/tensorflow_datasets",  # where TFDS prepares (array_record) and reads
        image_size=image_size,
        path="",  # image_caption: a folder of images + .txt captions, or a .csv / .parquet
        manual_dir="",  # imagenet2012: the folder holding the two ILSVRC2012 tar files
        caption_template=DEFAULT_CAPTION_TEMPLATE,  # class datasets; {a} is "a" or "an"
        in_memory=True,  # decode the split once into RAM; False: read each batch's examples
        precomputed_latents_dir="",  # `ldm-jax encode --out DIR`: ldm and finetune read latents
    )
    unknown = set(fields) - set(defaults)
    if unknown:
        raise ValueError(f"unknown data fields {sorted(unknown)}; valid: {sorted(defaults)}")
    return {**defaults, **fields}


def load_dataset(config, split: str = "train", *, crop: str = "center"):
    """The split named by `config.data`: images uint8[N, H, W, 3] and captions (object[N] str).

    crop="none" (image_caption only): images resized to shorter side `image_size`, uncropped
    (an object array of uint8[h, w, 3] in memory), for a trainer that crops every step.

    Returns a dict of numpy arrays (shapes, or `config.data.in_memory`), or a `RecordTable` whose
    columns are read on demand; both have keys "image", "caption" (+ "label" for class data;
    + SIZE_COLUMNS for image_caption; shapes also has "canonical_caption" and its attribute
    labels).
    """
    data = config.data
    if data.name not in DATASETS:
        raise ValueError(f"unknown dataset {data.name!r}; known: {', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; valid: train, test")
    if crop != "center" and data.name != "image_caption":
        raise ValueError(
            f"uncropped images (random crops) need the image_caption dataset, not {data.name}"
        )
    if data.name == "shapes":
        from ldm_jax.data import shapes_tfds  # imports tensorflow: only when data is needed

        return shapes_tfds.load_split(
            split,
            data_dir=os.path.expanduser(data.data_dir),
            config_name=data.config_name,
        )
    _, source = _tfds_source(config, SPLITS[data.name][split], crop)
    template = data.get("caption_template") or DEFAULT_CAPTION_TEMPLATE
    convert, columns = _converter(data.name, data.image_size, template, crop)
    table = RecordTable(source, convert, columns)
    if data.get("in_memory", True):
        return table.to_numpy()
    return table
