"""Samplers: one signature, a registry by name, the whole loop inside `lax.fori_loop`.

Every sampler is `sampler(model_fn, noise, schedule, num_steps, rng, **options) -> x_0` where
- model_fn(x_t: f32[B,...], t: f32[B]) -> network output in `prediction_type` (x_t in the VP
  scaling the network was trained on, t in training-timestep units, fractional where a
  sigma-space sampler needs it);
- noise: standard-normal f32[B,...] initial noise (each sampler scales it as its algorithm needs);
- schedule: a `NoiseSchedule`; num_steps: static int; rng: PRNG key (used by stochastic ones);
- options: keyword-only, in diffusers' vocabulary (`prediction_type`, `timestep_spacing`,
  `steps_offset`, `use_karras_sigmas`, ...); the VP solvers (DPM-Solver, UniPC, DEIS) also take
  `sigmas`, an explicit schedule (e.g. an optimized one, see experiments/sampler_benchmark).
Timesteps and sigmas are computed on the host from the static `num_steps`, so changing the seed,
prompts or guidance scale reuses the compiled loop.

Families live in their own modules: `ddim_ddpm` (DDIM, DDPM), `k_diffusion` (sigma-space samplers of
Karras et al. 2022 / k-diffusion: Euler, Heun, LMS, DPM2 and ancestral variants), `pndm`, `lcm`,
`dpm_solver` (DPM-Solver / DPM-Solver++ single- and multistep, SDE variants), `unipc`, `deis`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from ldm_jax import rng

SAMPLERS: dict[str, Callable] = {}


def register(name: str):
    """Decorator: add a sampler to the registry under `name`."""

    def wrap(fn):
        if name in SAMPLERS:
            raise ValueError(f"sampler {name!r} registered twice")
        SAMPLERS[name] = fn
        return fn

    return wrap


def get_sampler(name: str) -> Callable:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name]


def sampler_names() -> list[str]:
    return sorted(SAMPLERS)


def normal_like(key, x: jnp.ndarray) -> jnp.ndarray:
    """Standard-normal noise of x's shape and dtype (`ldm_jax.rng.normal`: the values of
    `jax.random.normal`, compiled faster on CPU)."""
    return rng.normal(key, x.shape, x.dtype)


# Importing the family modules fills the registry (they import `register` from here).
from ldm_jax.diffusion.samplers import (  # noqa: E402
    deis,  # noqa: F401
    dpm_solver,  # noqa: F401
    k_diffusion,  # noqa: F401
    lcm,  # noqa: F401
    pndm,  # noqa: F401
    unipc,  # noqa: F401
)
from ldm_jax.diffusion.samplers.ddim_ddpm import ddim, ddpm  # noqa: E402

__all__ = [
    "SAMPLERS",
    "ddim",
    "ddpm",
    "get_sampler",
    "normal_like",
    "register",
    "sampler_names",
]
