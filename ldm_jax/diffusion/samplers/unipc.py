"""UniPC (Zhao et al. 2023), as diffusers' UniPCMultistepScheduler."""

from __future__ import annotations

from ldm_jax.diffusion.samplers import register  # noqa: F401
