"""Sigma-space samplers (Karras et al. 2022; k-diffusion): Euler, Heun, LMS, DPM2 and ancestral variants, DPM-Solver++ SDE."""

from __future__ import annotations

from ldm_jax.diffusion.samplers import register  # noqa: F401
