"""Class-conditional-by-caption latent diffusion on CIFAR-10 (32x32), captions "a photo of a cat".

The shapes models and schedule (configs/shapes.py) on TFDS `cifar10`; only the data differ:

  ldm-jax train --config configs/cifar10.py:autoencoder --workdir runs/cifar10/autoencoder
  ldm-jax train --config configs/cifar10.py:ldm --workdir runs/cifar10/ldm \
      --config.autoencoder_workdir=runs/cifar10/autoencoder

TFDS downloads CIFAR-10 on first use (163 MB) into `config.data.data_dir`, prepared as
array_record. `,smoke` shrinks the models as shapes' smoke does (the tests run it on
`tfds.testing.mock_data`). An untuned starting point: no result is claimed yet.
"""

import pathlib

from ldm_jax.config import load_config_file
from ldm_jax.data.pipeline import CIFAR10_CLASSES, class_caption, data_config

SHAPES = pathlib.Path(__file__).with_name("shapes.py")


def get_config(arg=None):
    parts = (arg or "ldm").split(",")
    if "64" in parts:
        raise ValueError(f"configs/cifar10.py: bad argument {arg!r}; use a stage [,smoke]")
    c = load_config_file(f"{SHAPES}:{arg or 'ldm'}")  # shapes' stage, sizes, optimizer, smoke
    with c.unlocked():
        c.data = data_config("cifar10", image_size=32)  # 50,000 images: in memory (150 MB)
        c.tokenizer.update(name="byte", context_length=77, vocabulary=())  # open vocabulary
        c.sample.prompts = tuple(class_caption(c.data.caption_template, n) for n in CIFAR10_CLASSES)
        if "smoke" in parts:
            c.sample.prompts = c.sample.prompts[:2]
    return c
