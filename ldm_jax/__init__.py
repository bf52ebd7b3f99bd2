"""ldm_jax: latent diffusion (the Stable Diffusion family) in JAX/Flax.

Importing the package is cheap and imports neither tensorflow, wandb nor torch: those are imported
where they are used (the TFDS builders, the wandb writer, the converters and tests).
"""

__version__ = "0.1.0"
