"""The Inception-v3 of FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018), NHWC.

FID is defined by one network: the TensorFlow Inception-v3 graph of 2015-12-05
(`pt_inception-2015-12-05-6726825d.pth` in pytorch-fid, `weights-inception-2015-12-05-6726825d.pth`
in torch-fidelity, the same tensors under torchvision's `Inception3` names). It is not
torchvision's ImageNet Inception: its average pools leave the padding out of the mean
(`count_include_pad=False`), the last block max-pools where the paper average-pools, and the
classifier has 1008 classes. Modules here carry the PyTorch names (`Mixed_5b/branch5x5_1/conv`),
so those files load name by name (`convert.inception.load_inception_params`).

Preprocessing decides the last digits of a reported FID, so it is a choice, not a detail:
- "tf1" (default): the original TensorFlow code of the FID paper (TTUR), which papers report and
  torch-fidelity and clean-fid's "legacy_tensorflow" reproduce: TF 1.x `resize_bilinear` without
  half-pixel centers (source = dest * in/out), then (x - 128) / 128 on 0..255 values.
- "pytorch_fid": pytorch-fid's `F.interpolate(..., mode="bilinear", align_corners=False)` on
  [0, 1] values (half-pixel centers), then 2x - 1.
The two give FIDs a few tenths apart; compare only numbers made the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
FEATURE_DIM = 2048  # pool_3, the features of FID and KID
NUM_CLASSES = 1008  # the 2015 graph's classifier (1000 ImageNet classes + 8 unused)
PREPROCESSING = ("tf1", "pytorch_fid")
BN_EPS = 1e-3  # TensorFlow's Inception batch-norm epsilon (torchvision's BasicConv2d uses it too)


def _tf1_bilinear_axis(in_size: int, out_size: int):
    """(lo, hi, frac) for one axis of TF 1.x `resize_bilinear(align_corners=False)`: source
    coordinate = dest * (in/out), no half-pixel offset (TensorFlow's legacy scaler), float32 as
    TensorFlow computes it."""
    src = np.arange(out_size, dtype=np.float32) * np.float32(in_size / out_size)
    lo = src.astype(np.int32)  # floor: src >= 0
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (src - lo.astype(np.float32))


def resize_tf1(images: jax.Array, size: int) -> jax.Array:
    """float32[B, H, W, C] -> float32[B, size, size, C], TF 1.x bilinear (see module docstring):
    lerp along width first, then height, as TensorFlow's kernel does."""
    _, h, w, _ = images.shape
    ylo, yhi, dy = _tf1_bilinear_axis(h, size)
    xlo, xhi, dx = _tf1_bilinear_axis(w, size)
    dx = jnp.asarray(dx)[None, None, :, None]
    dy = jnp.asarray(dy)[None, :, None, None]
    top, bottom = images[:, ylo], images[:, yhi]
    top = top[:, :, xlo] + (top[:, :, xhi] - top[:, :, xlo]) * dx
    bottom = bottom[:, :, xlo] + (bottom[:, :, xhi] - bottom[:, :, xlo]) * dx
    return top + (bottom - top) * dy


def preprocess(images: jax.Array, preprocessing: str = "tf1") -> jax.Array:
    """uint8 (or float 0..255) [B, H, W, 3] -> float32[B, 299, 299, 3] in [-1, 1] as the network
    expects, by the named convention (module docstring)."""
    x = images.astype(jnp.float32)
    if preprocessing == "tf1":
        return (resize_tf1(x, INPUT_SIZE) - 128.0) / 128.0
    if preprocessing == "pytorch_fid":
        b, _, _, c = x.shape
        # antialias=False: torch's bilinear interpolate has no antialiasing filter when shrinking.
        x = jax.image.resize(x / 255.0, (b, INPUT_SIZE, INPUT_SIZE, c), "linear", antialias=False)
        return 2.0 * x - 1.0
    raise ValueError(f"unknown preprocessing {preprocessing!r}; valid: {', '.join(PREPROCESSING)}")


class BatchNorm(nn.Module):
    """Inference batch norm with the checkpoint's running statistics as parameters (the network
    is frozen; nothing here updates them). Names: PyTorch's weight/bias/running_mean/running_var."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("running_mean", nn.initializers.zeros, (c,))
        var = self.param("running_var", nn.initializers.ones, (c,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm -> ReLU. kernel/padding as (height, width)."""

    features: int
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=self.stride,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            name="conv",
        )(x)
        return nn.relu(BatchNorm(name="bn")(x))


def _avg_pool_3x3(x):
    # TensorFlow's average pool divides by the number of real (unpadded) inputs.
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), (2, 2), "VALID")


def _chain(x, convs: Sequence[BasicConv2d]):
    for conv in convs:
        x = conv(x)
    return x


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        c = BasicConv2d
        b1 = c(64, name="branch1x1")(x)
        b5 = _chain(
            x, [c(48, name="branch5x5_1"), c(64, (5, 5), padding=(2, 2), name="branch5x5_2")]
        )
        b3 = _chain(
            x,
            [
                c(64, name="branch3x3dbl_1"),
                c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2"),
                c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3"),
            ],
        )
        pool = c(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, pool], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        c = BasicConv2d
        b3 = c(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = _chain(
            x,
            [
                c(64, name="branch3x3dbl_1"),
                c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2"),
                c(96, (3, 3), stride=2, name="branch3x3dbl_3"),
            ],
        )
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c, c7 = BasicConv2d, self.channels_7x7
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        b1 = c(192, name="branch1x1")(x)
        b7 = _chain(
            x,
            [c(c7, name="branch7x7_1"), c(c7, **row, name="branch7x7_2")]
            + [c(192, **col, name="branch7x7_3")],
        )
        bd = _chain(
            x,
            [
                c(c7, name="branch7x7dbl_1"),
                c(c7, **col, name="branch7x7dbl_2"),
                c(c7, **row, name="branch7x7dbl_3"),
                c(c7, **col, name="branch7x7dbl_4"),
                c(192, **row, name="branch7x7dbl_5"),
            ],
        )
        pool = c(192, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, pool], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        c = BasicConv2d
        b3 = _chain(x, [c(192, name="branch3x3_1"), c(320, (3, 3), stride=2, name="branch3x3_2")])
        b7 = _chain(
            x,
            [
                c(192, name="branch7x7x3_1"),
                c(192, (1, 7), padding=(0, 3), name="branch7x7x3_2"),
                c(192, (7, 1), padding=(3, 0), name="branch7x7x3_3"),
                c(192, (3, 3), stride=2, name="branch7x7x3_4"),
            ],
        )
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """`max_pool`: the 2015 graph's last block (Mixed_7c) max-pools its pool branch; Mixed_7b
    average-pools (pytorch-fid's FIDInceptionE_2 / FIDInceptionE_1)."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        c = BasicConv2d
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        b1 = c(320, name="branch1x1")(x)
        b3 = c(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [c(384, **row, name="branch3x3_2a")(b3), c(384, **col, name="branch3x3_2b")(b3)], -1
        )
        bd = _chain(
            x,
            [c(448, name="branch3x3dbl_1"), c(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")],
        )
        bd = jnp.concatenate(
            [c(384, **row, name="branch3x3dbl_3a")(bd), c(384, **col, name="branch3x3dbl_3b")(bd)],
            -1,
        )
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        pool = c(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, pool], axis=-1)


class FIDInceptionV3(nn.Module):
    """images uint8[B, H, W, 3] (any size; resized to 299) -> {"pool": f32[B, 2048] (pool_3, the
    features of FID / KID), "logits": f32[B, 1008]}."""

    preprocessing: str = "tf1"

    @nn.compact
    def __call__(self, images):
        c = BasicConv2d
        x = preprocess(images, self.preprocessing)
        x = c(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = c(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = c(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = c(80, name="Conv2d_3b_1x1")(x)
        x = c(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool_features, name=name)(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (
            ("Mixed_6b", 128),
            ("Mixed_6c", 160),
            ("Mixed_6d", 160),
            ("Mixed_6e", 192),
        ):
            x = InceptionC(c7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        return {"pool": pool, "logits": nn.Dense(NUM_CLASSES, name="fc")(pool)}


def abstract_params(model: FIDInceptionV3 | None = None):
    """The params tree's shapes (nothing computed)."""
    model = model or FIDInceptionV3()
    images = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.uint8)
    return jax.eval_shape(model.init, jax.random.key(0), images)["params"]
