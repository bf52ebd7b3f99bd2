"""DPM-Solver and DPM-Solver++ (Lu et al. 2022a,b), single- and multistep, and the SDE variants."""

from __future__ import annotations

from ldm_jax.diffusion.samplers import register  # noqa: F401
