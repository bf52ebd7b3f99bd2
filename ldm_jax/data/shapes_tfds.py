"""The `shapes` dataset as a TFDS builder (prepared offline from `data.shapes`), and a loader.

Imports tensorflow_datasets, so neither `ldm_jax` nor `ldm_jax.data` imports this module.

  builder = Shapes(config="32", data_dir="/tmp/tfds"); builder.download_and_prepare()
  arrays = load_split("train", data_dir="/tmp/tfds")  # the whole split as numpy, stored order
"""

import dataclasses
import os
from typing import ClassVar

# TF's C++ logging ("oneDNN custom operations are on", CPU-feature notices) is noise here; the
# setting is read when tensorflow is first imported, so it has to be made before tfds imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TF 2.21 prints its oneDNN notice regardless of the level above; TF only encodes and decodes PNGs
# here, for which oneDNN makes no difference.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np
import tensorflow_datasets as tfds

from ldm_jax.data import shapes

# Seeds of the two splits: different, so that test examples are not copies of train examples
# (each of the 720 attribute combinations still appears in both, with different jitter).
SPLIT_SEEDS = {"train": 0, "test": 1}


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    """image_size: pixels per side; num_train / num_test: examples per split; concept: a
    held-out concept that every `concept_every`-th example has (`shapes.CONCEPTS`), or None."""

    image_size: int = 32
    num_train: int = 24_000
    num_test: int = 1_000
    concept: str | None = None
    concept_every: int = 1


class Shapes(tfds.core.GeneratorBasedBuilder):
    """One anti-aliased shape on a plain background, with captions; see `ldm_jax.data.shapes`."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Initial release: 3 backgrounds x 8 colours x 3 shapes x 2 sizes x 5 positions.",
        "1.1.0": "Held-out concepts (configs cross, navy, cross_replay, navy_replay); labels "
        "name them after the base names. "
        "The examples of 32, 64 and smoke are those of 1.0.0.",
    }
    BUILDER_CONFIGS: ClassVar[list[ShapesConfig]] = [
        ShapesConfig(name="32", description="32x32 images; 24,000 train, 1,000 test."),
        ShapesConfig(
            name="64", description="64x64 images; 24,000 train, 1,000 test.", image_size=64
        ),
        ShapesConfig(
            name="smoke",
            description="32x32 images; 512 train, 128 test (for tests).",
            num_train=512,
            num_test=128,
        ),
        *(
            ShapesConfig(
                name=concept,
                description=f"32x32 images that all have the held-out {attribute} {concept!r} "
                "(never in the other configs); 512 train, 128 test.",
                num_train=512,
                num_test=128,
                concept=concept,
            )
            for concept, (attribute, _) in shapes.CONCEPTS.items()
        ),
        *(
            ShapesConfig(
                name=f"{concept}_replay",
                description=f"32x32 images, every second one with the held-out {attribute} "
                f"{concept!r}, the others as in the main configs; 1024 train, 256 test.",
                num_train=1024,
                num_test=256,
                concept=concept,
                concept_every=2,
            )
            for concept, (attribute, _) in shapes.CONCEPTS.items()
        ),
    ]
    DEFAULT_CONFIG_NAME = "32"

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        labels = {
            key: tfds.features.ClassLabel(names=list(names))
            for key, names in shapes.LABEL_NAMES.items()
        }
        return self.dataset_info_from_configs(
            description=shapes.__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3)),
                    "caption": tfds.features.Text(),
                    "canonical_caption": tfds.features.Text(),
                    **labels,
                }
            ),
            supervised_keys=("caption", "image"),
            # Keep the generation order: examples are already i.i.d., and a stored order equal to
            # `shapes.generate_examples(seed, n)` lets tests compare the two directly.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the data are procedural.
        config = self.builder_config
        counts = {"train": config.num_train, "test": config.num_test}
        return {
            split: self._generate_examples(SPLIT_SEEDS[split], count)
            for split, count in counts.items()
        }

    def _generate_examples(self, seed: int, num_examples: int):
        config = self.builder_config
        yield from shapes.generate_examples(
            seed, num_examples, config.image_size, config.concept, config.concept_every
        )


def load_split(split: str, *, data_dir: str, config_name: str = "32") -> dict[str, np.ndarray]:
    """Prepares `config_name` in `data_dir` if needed and returns one split in memory, stored order.

    Returns: image uint8[N, H, W, 3]; caption, canonical_caption: object[N] of python str;
    background,
    color, shape, size, position: int32[N] (indices into `shapes.LABEL_NAMES`).
    """
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; valid: {sorted(SPLIT_SEEDS)}")
    builder = Shapes(config=config_name, data_dir=data_dir)
    # Procedural data: never look for a prepared copy on GCS (tfds 4.9 also has GCS off by default).
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    batch = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
    out = {"image": np.asarray(batch["image"], np.uint8)}
    for key in ("caption", "canonical_caption"):
        out[key] = np.array([text.decode("utf-8") for text in batch[key]], dtype=object)
    for key in shapes.LABEL_NAMES:
        out[key] = np.asarray(batch[key], np.int32)
    return out
