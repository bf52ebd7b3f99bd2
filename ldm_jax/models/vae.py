"""The KL-regularized autoencoder of latent diffusion (Rombach et al. 2022, sec. 3 and app. G),
laid out like diffusers' `AutoencoderKL` (`encoder/down_blocks_0/resnets_1/conv1`, `quant_conv`,
...), NHWC. Images are float32[B, H, W, 3] in [-1, 1]; latents float32[B, H/f, W/f, latent_channels]
with f = 2**(len(block_out_channels) - 1). The latent diffusion model sees
`latents * scaling_factor` (0.18215 for SD1/2, chosen to give latents unit variance).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ldm_jax import rng as rng_lib
from ldm_jax.models.layers import (
    Attention,
    Downsample2D,
    ResnetBlock2D,
    Upsample2D,
    conv,
    group_norm,
)

Dtype = Any
VAE_EPS = 1e-6  # diffusers' Encoder/Decoder use GroupNorm eps 1e-6 everywhere


@flax.struct.dataclass
class DiagonalGaussianDistribution:
    """diffusers `DiagonalGaussianDistribution`: the encoder's posterior q(z|x).

    mean, logvar: float32[B, h, w, latent_channels]; logvar clipped to [-30, 20] as diffusers.
    """

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussianDistribution:
        """moments: [B, h, w, 2*latent], mean first then logvar (torch chunks dim 1 the same way)."""
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        """Reparameterized sample mean + std * N(0, I), float32[B, h, w, latent]."""
        return self.mean + self.std * rng_lib.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) in nats, float32[B], summed over h, w and channels (as diffusers)."""
        return 0.5 * jnp.sum(self.mean**2 + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


class UNetMidBlock2D(nn.Module):
    """diffusers `UNetMidBlock2D` as used by the VAE: resnet -> single-head attention -> resnet,
    no time embedding. x: [B, h, w, C] -> same."""

    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        res = lambda i: ResnetBlock2D(
            c, self.norm_groups, VAE_EPS, use_temb=False, dtype=self.dtype, name=f"resnets_{i}"
        )
        x = res(0)(x, None, train)
        # attention_head_dim = channels -> one head of width C, with q/k/v biases, GroupNorm and
        # a residual (the LDM `AttnBlock` that diffusers converts into an `Attention`).
        x = Attention(
            heads=1,
            dim_head=c,
            qkv_bias=True,
            norm_groups=self.norm_groups,
            norm_eps=VAE_EPS,
            dtype=self.dtype,
            name="attentions_0",
        )(x)
        return res(1)(x, None, train)


class _Block(nn.Module):
    """diffusers `DownEncoderBlock2D` (resample="down") / `UpDecoderBlock2D` (resample="up"):
    `num_layers` resnets without time embedding, then the optional resampler."""

    out_channels: int
    num_layers: int
    resample: str | None = None  # "down", "up" or None (last level)
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h, train: bool = False):
        for j in range(self.num_layers):
            h = ResnetBlock2D(
                self.out_channels,
                self.norm_groups,
                VAE_EPS,
                use_temb=False,
                dtype=self.dtype,
                name=f"resnets_{j}",
            )(h, None, train)
        if self.resample == "down":  # asymmetric (0, 1) padding: diffusers downsample_padding=0
            h = Downsample2D(self.out_channels, 0, self.dtype, name="downsamplers_0")(h)
        elif self.resample == "up":
            h = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(h)
        return h


class Encoder(nn.Module):
    """diffusers `Encoder` (double_z=True): [B, H, W, in] -> moments [B, H/f, W/f, 2*latent]."""

    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        boc = self.block_out_channels
        h = conv(boc[0], 3, self.dtype, "conv_in")(x.astype(self.dtype))
        for i, ch in enumerate(boc):
            h = _Block(
                ch,
                self.layers_per_block,
                "down" if i < len(boc) - 1 else None,
                self.norm_num_groups,
                self.dtype,
                name=f"down_blocks_{i}",
            )(h, train)
        h = UNetMidBlock2D(self.norm_num_groups, self.dtype, name="mid_block")(h, train)
        h = nn.silu(group_norm(self.norm_num_groups, VAE_EPS, self.dtype, "conv_norm_out")(h))
        return conv(2 * self.latent_channels, 3, self.dtype, "conv_out")(h)


class Decoder(nn.Module):
    """diffusers `Decoder`: latents [B, h, w, latent] -> [B, h*f, w*f, out_channels]."""

    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z, train: bool = False):
        rev = tuple(reversed(self.block_out_channels))
        h = conv(rev[0], 3, self.dtype, "conv_in")(z.astype(self.dtype))
        h = UNetMidBlock2D(self.norm_num_groups, self.dtype, name="mid_block")(h, train)
        for i, ch in enumerate(rev):  # one more resnet per level than the encoder, as diffusers
            h = _Block(
                ch,
                self.layers_per_block + 1,
                "up" if i < len(rev) - 1 else None,
                self.norm_num_groups,
                self.dtype,
                name=f"up_blocks_{i}",
            )(h, train)
        h = nn.silu(group_norm(self.norm_num_groups, VAE_EPS, self.dtype, "conv_norm_out")(h))
        return conv(self.out_channels, 3, self.dtype, "conv_out")(h)


class AutoencoderKL(nn.Module):
    """diffusers `AutoencoderKL`: encoder -> quant_conv (1x1) -> posterior; post_quant_conv (1x1)
    -> decoder. Fields use diffusers' config names (`vae/config.json`)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    dtype: Dtype = jnp.float32

    def setup(self):
        kw = {
            "block_out_channels": tuple(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.norm_num_groups,
            "dtype": self.dtype,
        }
        self.encoder = Encoder(latent_channels=self.latent_channels, **kw)
        self.decoder = Decoder(out_channels=self.out_channels, **kw)
        if self.use_quant_conv:
            self.quant_conv = conv(2 * self.latent_channels, 1, self.dtype, "quant_conv")
        if self.use_post_quant_conv:
            self.post_quant_conv = conv(self.latent_channels, 1, self.dtype, "post_quant_conv")

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def encode(self, x: jax.Array, train: bool = False) -> DiagonalGaussianDistribution:
        """x: float32[B, H, W, in_channels] in [-1, 1] -> posterior over [B, H/f, W/f, latent]."""
        moments = self.encoder(x, train)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussianDistribution.from_moments(moments)

    def decode(self, z: jax.Array, train: bool = False) -> jax.Array:
        """z: float32[B, h, w, latent] (unscaled latents) -> float32[B, h*f, w*f, out_channels]."""
        z = z.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z, train).astype(jnp.float32)

    def __call__(
        self,
        x: jax.Array,
        rng: jax.Array | None = None,
        sample_posterior: bool = False,
        train: bool = False,
    ) -> tuple[jax.Array, DiagonalGaussianDistribution]:
        """Reconstruct x through the posterior sample (with `rng`) or its mode. Returns
        (reconstruction float32[B, H, W, out_channels], posterior)."""
        posterior = self.encode(x, train)
        if sample_posterior:
            if rng is None:
                raise ValueError("sample_posterior=True needs rng")
            z = posterior.sample(rng)
        else:
            z = posterior.mode()
        return self.decode(z, train), posterior


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of length `tile` covering [0, size) at `stride`; the last tile is
    moved back to end at `size`, so every tile has the same shape (one compiled decoder)."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def blend_weights(length: int, ramp: int) -> jax.Array:
    """float32[length]: 1 in the middle, rising linearly over `ramp` pixels at both ends (never 0,
    so a pixel covered by one tile only keeps that tile's value after normalization)."""
    i = jnp.arange(length, dtype=jnp.float32) + 0.5
    if ramp <= 0:
        return jnp.ones((length,), jnp.float32)
    return jnp.clip(jnp.minimum(i, length - i) / ramp, 0.0, 1.0)


def blend_tiles(tiles: jax.Array, starts_y, starts_x, height: int, width: int, ramp: int):
    """Overlap-add of tiles [Ty*Tx, B, th, tw, C] placed at (starts_y[i], starts_x[j]) (pixels),
    each weighted by a separable linear ramp over `ramp` pixels, then normalized by the summed
    weights. Returns [B, height, width, C]. Tiles that agree on their overlaps blend exactly."""
    _, b, th, tw, c = tiles.shape
    weight = blend_weights(th, ramp)[:, None] * blend_weights(tw, ramp)[None, :]
    out = jnp.zeros((b, height, width, c), jnp.float32)
    total = jnp.zeros((height, width), jnp.float32)
    k = 0
    for y in starts_y:
        for x in starts_x:
            out = out.at[:, y : y + th, x : x + tw].add(tiles[k] * weight[None, :, :, None])
            total = total.at[y : y + th, x : x + tw].add(weight)
            k += 1
    return out / total[None, :, :, None]


def decode_tiled(
    vae: AutoencoderKL,
    params,
    z: jax.Array,
    tile_latent_size: int = 64,
    overlap: float = 0.25,
) -> jax.Array:
    """Decode large latents tile by tile, as diffusers' `AutoencoderKL.tiled_decode`: overlapping
    latent tiles of `tile_latent_size` (64 = 512 px for SD's f=8), decoded one at a time
    (`lax.map`, so memory is one tile's) and blended linearly across the `overlap` fraction.

    diffusers blends each tile into its upper/left neighbours and crops; here every tile has the
    same shape and overlapping tiles are averaged with linear-ramp weights, which is the same
    idea. The result approximates `vae.decode` (the decoder sees less context at tile borders).

    z: float32[B, h, w, latent] unscaled latents -> float32[B, h*f, w*f, out_channels].
    """
    b, h, w, _ = z.shape
    f = vae.downsampling_factor
    th, tw = min(tile_latent_size, h), min(tile_latent_size, w)
    overlap_latent = int(round(tile_latent_size * overlap))
    stride = tile_latent_size - overlap_latent
    if stride <= 0:
        raise ValueError(f"overlap={overlap} leaves no stride for tiles of {tile_latent_size}")
    sy, sx = tile_starts(h, th, stride), tile_starts(w, tw, stride)
    if len(sy) == len(sx) == 1:
        return vae.apply(params, z, method=vae.decode)
    tiles = jnp.stack([z[:, y : y + th, x : x + tw] for y in sy for x in sx])
    decoded = jax.lax.map(lambda t: vae.apply(params, t, method=vae.decode), tiles)
    return blend_tiles(
        decoded, [y * f for y in sy], [x * f for x in sx], h * f, w * f, overlap_latent * f
    )


VAE_VARIANTS: dict[str, dict[str, Any]] = {
    # The SD1/2 VAE (stabilityai/sd-vae-ft-mse layout): 83,653,863 parameters, f = 8.
    "sd": {
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "scaling_factor": 0.18215,
    },
    # For tests and CPU smoke runs on 32x32 RGB, f = 4.
    "tiny": {
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 16,
        "scaling_factor": 1.0,
    },
}


def vae_from_variant(name: str, **overrides) -> AutoencoderKL:
    fields = {**VAE_VARIANTS[name], **overrides}
    fields["block_out_channels"] = tuple(fields["block_out_channels"])
    return AutoencoderKL(**fields)
