"""Loading a dataset into host memory, and batching it deterministically from (seed, step).

The batch for step s is a pure function of (seed, s): epoch e = s*B // N uses the permutation
`default_rng([seed, e])`. A resumed run therefore sees exactly the batches an uninterrupted run
would have seen, with no iterator state to checkpoint. Each process takes its own contiguous slice
of the global batch (multi-host data loading).
"""

from __future__ import annotations

import os

import jax
import numpy as np


class StepIndexedBatches:
    """batches[step] -> dict of numpy arrays holding this process's part of the global batch."""

    def __init__(self, arrays: dict[str, np.ndarray], global_batch_size: int, seed: int):
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
        return {k: v[idx] for k, v in self.arrays.items()}


def load_dataset(config, split: str = "train") -> dict[str, np.ndarray]:
    """The whole split named by `config.data` in memory (images, captions, labels)."""
    from ldm_jax.data import shapes_tfds  # imports tensorflow: only when data is needed

    if config.data.name != "shapes":
        raise ValueError(f"unknown dataset {config.data.name!r}; known: shapes")
    return shapes_tfds.load_split(
        split,
        data_dir=os.path.expanduser(config.data.data_dir),
        config_name=config.data.config_name,
    )
