"""Random draws shared by the trainers, samplers and models.

`normal` is `jax.random.normal` drawn flat and reshaped: the same values (the partitionable
threefry that jax uses by default counts over the flattened index), but XLA:CPU compiles the
N-D draw about 8x slower (a 4x64x64x4 draw: 17 s against 2 s) and runs it slower too, and every
training and sampling step draws image-shaped noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

SEED_MAX = 2**32 - 1  # seeds are uint32: jax.random.key's range


def normal(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Standard-normal f[shape]; equal to `jax.random.normal(key, shape, dtype)`."""
    return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def seed_array(seeds: Sequence[int], name: str = "seed") -> np.ndarray:
    """uint32[N] from integer seeds; a seed outside [0, 2**32 - 1] is a ValueError naming it
    (numpy would wrap -5 to 4294967291 or raise a bare OverflowError)."""
    values = list(seeds)
    integer = lambda s: isinstance(s, int | np.integer) and not isinstance(s, bool)
    bad = [s for s in values if not (integer(s) and 0 <= s <= SEED_MAX)]
    if bad:
        raise ValueError(f"{name}s must be integers in [0, 2**32 - 1], got {bad[:3]}")
    return np.asarray(values, np.int64).astype(np.uint32)
