"""DEIS (Zhang & Chen 2023), as diffusers' DEISMultistepScheduler."""

from __future__ import annotations

from ldm_jax.diffusion.samplers import register  # noqa: F401
