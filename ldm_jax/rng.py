"""Random draws shared by the trainers, samplers and models.

`normal` is `jax.random.normal` drawn flat and reshaped: the same values (the partitionable
threefry that jax uses by default counts over the flattened index), but XLA:CPU compiles the
N-D draw about 8x slower (a 4x64x64x4 draw: 17 s against 2 s) and runs it slower too, and every
training and sampling step draws image-shaped noise.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def normal(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Standard-normal f[shape]; equal to `jax.random.normal(key, shape, dtype)`."""
    return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)
