"""PNDM / PLMS (Liu et al. 2022), as diffusers' PNDMScheduler."""

from __future__ import annotations

from ldm_jax.diffusion.samplers import register  # noqa: F401
