"""Gaussian-mixture data with an exact denoiser: a perfect "network" for testing samplers.

For x_0 ~ sum_k w_k N(mu_k, s_k^2 I) and x_t = a x_0 + b eps (a = sqrt(abar), b = sqrt(1 - abar)),
each component gives x_t | k ~ N(a mu_k, (a^2 s_k^2 + b^2) I), so the posterior over components is a
softmax of Gaussian log-likelihoods and
    E[x_0 | x_t] = sum_k r_k(x_t) (mu_k + a s_k^2 / (a^2 s_k^2 + b^2) (x_t - a mu_k)),
the Bayes-optimal x_0 prediction (Tweedie). A sampler driven by it is limited only by its own
discretization, which is what the sampler tests and the sampler benchmark measure.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion import objectives
from ldm_jax.diffusion.schedules import NoiseSchedule, t_to_sigma


@flax.struct.dataclass
class GaussianMixture:
    """weights: f32[K] (summing to 1), means: f32[K, D], stds: f32[K] (isotropic per component)."""

    weights: jnp.ndarray
    means: jnp.ndarray
    stds: jnp.ndarray

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, key, n: int) -> jnp.ndarray:
        """f32[n, D] exact samples of the data distribution."""
        k_comp, k_noise = jax.random.split(key)
        comp = jax.random.choice(k_comp, self.weights.shape[0], (n,), p=self.weights)
        z = jax.random.normal(k_noise, (n, self.dim))
        return self.means[comp] + self.stds[comp, None] * z

    def x0_mean(self, x_t: jnp.ndarray, alpha_bar: jnp.ndarray) -> jnp.ndarray:
        """E[x_0 | x_t] for x_t: f32[B, ...] (flattened to D = prod(...)) and alpha_bar: f32[B]."""
        shape = x_t.shape
        x = x_t.reshape(shape[0], -1)
        a = jnp.sqrt(alpha_bar)[:, None, None]  # [B, 1, 1]
        var = a**2 * self.stds[None, :, None] ** 2 + (1 - alpha_bar)[:, None, None]  # [B, K, 1]
        diff = x[:, None, :] - a * self.means[None]  # [B, K, D]
        log_lik = -0.5 * jnp.sum(diff**2, -1) / var[..., 0] - 0.5 * self.dim * jnp.log(var[..., 0])
        r = jax.nn.softmax(log_lik + jnp.log(self.weights)[None], axis=-1)  # [B, K]
        x0_k = self.means[None] + a * self.stds[None, :, None] ** 2 / var * diff
        return jnp.einsum("bk,bkd->bd", r, x0_k).reshape(shape)


def exact_model_fn(gmm: GaussianMixture, schedule: NoiseSchedule, prediction_type="epsilon"):
    """The Bayes-optimal network output `model_fn(x_t, t)` in `prediction_type`.

    t: f32[B] training-timestep units; fractional t means the noise level that log-linear sigma
    interpolation gives (`schedules.t_to_sigma`), the inverse of how sigma-space samplers choose t,
    so those samplers see the exact denoiser at the sigma they intend.
    """

    def model_fn(x_t, t):
        sigma = t_to_sigma(t.astype(jnp.float32), schedule)
        alpha_bar = 1.0 / (1.0 + sigma**2)
        x0 = gmm.x0_mean(x_t, alpha_bar)
        a = objectives._bcast(alpha_bar, x_t)
        eps = (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
        return objectives.training_target(x0, eps, alpha_bar, prediction_type)

    return model_fn


def default_mixture(dim: int = 2, seed: int = 0) -> GaussianMixture:
    """A fixed, moderately hard test mixture: 8 components of unequal weight and width, means on a
    ring of radius 2 (well separated relative to the stds 0.1-0.4), in the first two coordinates."""
    rng = np.random.default_rng(seed)
    k = 8
    angles = 2 * np.pi * np.arange(k) / k
    means = np.zeros((k, dim))
    means[:, 0], means[:, 1 % dim] = 2 * np.cos(angles), 2 * np.sin(angles)
    weights = rng.uniform(0.5, 1.5, k)
    stds = rng.uniform(0.1, 0.4, k)
    return GaussianMixture(
        weights=jnp.asarray(weights / weights.sum(), jnp.float32),
        means=jnp.asarray(means, jnp.float32),
        stds=jnp.asarray(stds, jnp.float32),
    )


def sliced_wasserstein(
    key, x: jnp.ndarray, y: jnp.ndarray, num_projections: int = 256
) -> jnp.ndarray:
    """Sliced 2-Wasserstein distance between two equal-size point clouds x, y: f32[N, D]
    (Rabin et al. 2011): the root mean, over random unit directions, of the squared W2 between
    the sorted 1-D projections."""
    dirs = jax.random.normal(key, (x.shape[1], num_projections))
    dirs = dirs / jnp.linalg.norm(dirs, axis=0, keepdims=True)
    px, py = jnp.sort(x @ dirs, axis=0), jnp.sort(y @ dirs, axis=0)
    return jnp.sqrt(jnp.mean((px - py) ** 2))
