"""FID and KID: feature statistics, the Fréchet distance, the kernel distance, reference files.

The math works on feature vectors (Inception pool3 activations, 2048-d, in practice) in float64,
with numpy only:

- `FeatureStatistics` accumulates mean and covariance batch by batch (Chan, Golub & LeVeque 1979),
  so a 50k-image reference never sits in memory and a large common offset in the features does
  not cancel the way sum(x x^T) - n mu mu^T does;
- `frechet_distance` (FID, Heusel et al. 2017) stays accurate for the singular covariances that
  fewer samples than dimensions give;
- `kernel_inception_distance` (KID, Bińkowski et al. 2018) is an unbiased MMD^2, so less biased
  than FID at small sample counts; it needs the features themselves, not just their statistics;
- `save_statistics` / `load_statistics` keep reference `.npz` files under the keys ("mu",
  "sigma") of pytorch-fid's and clean-fid's precomputed files, so those load here too.

Below the math: `InceptionFeatures` (the FID Inception of `ldm_jax.models.inception`, jitted and
data parallel), statistics of image folders and datasets, and `evaluate_samplers`, FID and KID of
a model trained here by sampler and number of network evaluations. jax is imported only there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import secrets
import time
import zipfile
from collections.abc import Iterator, Sequence

import numpy as np


@dataclasses.dataclass
class FeatureStatistics:
    """Running mean and covariance of feature vectors, float64, merged batch by batch with the
    pairwise update of Chan, Golub & LeVeque (1979), so that a 50k x 2048 reference never has to
    sit in memory and a large common offset does not cancel catastrophically."""

    num: int = 0  # vectors seen so far
    mean: np.ndarray | None = None  # float64[d] (None before the first update)
    m2: np.ndarray | None = None  # float64[d, d], sum of outer products of deviations from the mean

    def update(self, features) -> None:
        """Adds features: [b, d], any float dtype; b may be 0 or 1."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"expected features [batch, dim], got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or inf")
        if self.mean is None:
            self.mean, self.m2 = np.zeros(x.shape[1]), np.zeros((x.shape[1],) * 2)
        elif x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"features are {x.shape[1]}-d, earlier ones {self.mean.shape[0]}-d")
        num_b = x.shape[0]
        if num_b == 0:
            return
        # Each batch is centred at its own mean before the outer products, so the sums stay at the
        # scale of the spread, not of the offset; then merged with Chan et al.'s pairwise formula.
        mean_b = x.mean(axis=0)
        centered = x - mean_b
        m2_b = centered.T @ centered
        num = self.num + num_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (num_b / num)
        self.m2 = self.m2 + m2_b + np.outer(delta, delta) * (self.num * num_b / num)
        self.num = num

    @property
    def mu(self) -> np.ndarray:
        """float64[d]."""
        if self.num < 1:
            raise ValueError("no feature vectors yet: the mean is undefined")
        return self.mean

    @property
    def sigma(self) -> np.ndarray:
        """float64[d, d], unbiased (ddof=1), as np.cov(rowvar=False) and pytorch-fid."""
        if self.num < 2:
            raise ValueError(f"the covariance needs at least 2 feature vectors, have {self.num}")
        sigma = self.m2 / (self.num - 1)
        return (sigma + sigma.T) / 2  # exactly symmetric (the matmul's round-off need not be)


def _check_gaussian(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1:
        raise ValueError(f"mu{name} must be a vector [d], got shape {mu.shape}")
    if sigma.shape != (mu.shape[0],) * 2:
        raise ValueError(f"sigma{name} must be [d, d] = {(mu.shape[0],) * 2}, got {sigma.shape}")
    return mu, (sigma + sigma.T) / 2  # eigh reads one triangle; exact for a symmetric sigma


def _psd_eigen(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(square roots of the eigenvalues, eigenvectors) of a symmetric PSD matrix; round-off
    negative eigenvalues -> 0."""
    eigenvalues, eigenvectors = np.linalg.eigh(sigma)
    return np.sqrt(np.clip(eigenvalues, 0, None)), eigenvectors


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982; FID,
    Heusel et al. 2017): |mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^(1/2)).

    mu: float[d]; sigma: float[d, d] symmetric PSD (may be singular). Returns a python float >= 0.
    """
    mu1, sigma1 = _check_gaussian(mu1, sigma1, "1")
    mu2, sigma2 = _check_gaussian(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1/sigma1 are {mu1.shape[0]}-d but mu2/sigma2 {mu2.shape[0]}-d")
    # tr((s1 s2)^(1/2)) is the sum of the singular values of B = s2^(1/2) s1^(1/2), since
    # B^T B = s1^(1/2) s2 s1^(1/2) is similar to s1 s2: real symmetric arithmetic throughout, unlike
    # pytorch-fid's scipy.linalg.sqrtm(s1 @ s2) (a complex Schur form whose imaginary round-off is
    # dropped, non-finite for a singular product, hence its eps * I offset). The SVD of B, not
    # eigvalsh of a formed B^T B: with singular covariances (fewer samples than dims) forming B^T B
    # leaves ~eps |B|^2 of round-off on its zero eigenvalues, which the square root makes ~sqrt(eps)
    # |B| each (FID(a, a) = -4e-6 at 50 samples in 128 dims, as with sqrtm); the SVD's is ~eps |B|.
    # With s = V diag(r^2) V^T, B = V2 diag(r2) V2^T V1 diag(r1) V1^T has the singular values of
    # C = diag(r2) (V2^T V1) diag(r1) (orthogonal factors do not change them), and the rows and
    # columns of C where r = 0 are zero and dropped: a sample covariance of n < d images has
    # d - n round-off eigenvalues, about half of them negative, so C shrinks (2048-d FID of 12
    # images: 2.2 s instead of 3.7 s on the 2-core Xeon; full rank: the same ~4 s, and the same
    # value to 4e-15).
    r1, v1 = _psd_eigen(sigma1)
    r2, v2 = _psd_eigen(sigma2)
    k1, k2 = r1 > 0, r2 > 0
    c = r2[k2, None] * (v2[:, k2].T @ v1[:, k1]) * r1[None, k1]
    trace_sqrt = np.linalg.svd(c, compute_uv=False).sum() if c.size else 0.0
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    return max(float(distance), 0.0)  # >= 0 in exact arithmetic; a negative value is round-off


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray, kernel) -> float:
    """Unbiased MMD^2 of equal-size samples (Gretton et al. 2012, Lemma 6; used by KID)."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    sum_xx = k_xx.sum() - np.trace(k_xx)  # i != j
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    features1,
    features2,
    *,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018, "Demystifying MMD GANs": the unbiased MMD^2 estimator) with
    the polynomial kernel k(x, y) = (gamma x.y + coef0)^degree, gamma = 1/d by default: the mean and
    std over `num_subsets` random subsets of `subset_size` vectors drawn without replacement from
    each set (torch-fidelity's and clean-fid's defaults; the KID paper's code draws 50 subsets).

    features1: float[n1, d], features2: float[n2, d]. The std is np.std (ddof=0), as torch-fidelity.
    """
    x, y = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected features [n1, d] and [n2, d], got {x.shape} and {y.shape}")
    if min(x.shape[0], y.shape[0]) < subset_size:
        raise ValueError(f"subset_size {subset_size} > a set's size: {x.shape[0]} and {y.shape[0]}")
    if subset_size < 2:
        raise ValueError(f"the unbiased estimator needs subset_size >= 2, got {subset_size}")
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    kernel = lambda a, b: (gamma * (a @ b.T) + coef0) ** degree
    rng = np.random.default_rng(seed)
    mmds = []
    for _ in range(num_subsets):
        subset1 = x[rng.choice(len(x), subset_size, replace=False)]
        subset2 = y[rng.choice(len(y), subset_size, replace=False)]
        mmds.append(_unbiased_mmd2(subset1, subset2, kernel))
    return float(np.mean(mmds)), float(np.std(mmds))


def save_statistics(
    path, stats: FeatureStatistics, *, features=None, metadata: dict | None = None
) -> None:
    """Writes `path` (exactly that name) as .npz: mu, sigma, num_images, metadata (a JSON string,
    e.g. which Inception weights and preprocessing) and optionally features (float32[n, d], for
    KID). Atomic: a temporary file in the same folder, then os.replace."""
    path = pathlib.Path(path)
    arrays = {
        "mu": stats.mu,
        "sigma": stats.sigma,
        "num_images": np.int64(stats.num),
        "metadata": np.str_(json.dumps(metadata or {}, sort_keys=True)),
    }
    if features is not None:
        features = np.asarray(features, np.float32)
        if features.ndim != 2 or features.shape[1] != len(stats.mu):
            raise ValueError(f"features must be [n, {len(stats.mu)}] like mu, got {features.shape}")
        arrays["features"] = features
    # A hidden temporary name in the same folder (so os.replace is a rename on one filesystem),
    # opened with "xb" so the umask applies, as it would to a plain open().
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_statistics(path) -> dict:
    """Reads a reference .npz (ours, pytorch-fid's or clean-fid's) -> {"mu": float64[d],
    "sigma": float64[d, d], "num_images": int | None, "features": float32[n, d] | None,
    "metadata": dict}."""
    path = pathlib.Path(path)
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("an .npy array, not an .npz archive")
        with data:
            missing = [key for key in ("mu", "sigma") if key not in data.files]
            if missing:
                raise ValueError(f"missing key(s) {missing}; has {sorted(data.files)}")
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            num_images = int(data["num_images"]) if "num_images" in data.files else None
            features = data["features"].astype(np.float32) if "features" in data.files else None
            metadata = json.loads(str(data["metadata"])) if "metadata" in data.files else {}
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: no such statistics file") from e
    except (OSError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable statistics .npz: {e}") from e
    if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not match [d], [d, d]")
    if features is not None and (features.ndim != 2 or features.shape[1] != mu.shape[0]):
        raise ValueError(f"{path}: features {features.shape} do not match mu's dim {mu.shape[0]}")
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: metadata is not a JSON object: {metadata!r}")
    return dict(mu=mu, sigma=sigma, num_images=num_images, features=features, metadata=metadata)


# --- Inception features of images ----------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class InceptionFeatures:
    """The FID Inception (`ldm_jax.models.inception`), compiled once per image size, each batch
    split over the devices of `mesh` (data parallel over all devices by default):
    uint8[N, H, W, 3] -> float32[N, 2048] pool_3 features. `metadata` names the weights and the
    preprocessing, which every statistics file records: FIDs are comparable only when both match.
    """

    def __init__(self, params, *, preprocessing="tf1", batch_size=64, mesh=None, fingerprint=""):
        import jax

        from ldm_jax import sharding as sharding_lib
        from ldm_jax.models import inception

        if preprocessing not in inception.PREPROCESSING:
            raise ValueError(
                f"unknown preprocessing {preprocessing!r}; valid: {', '.join(inception.PREPROCESSING)}"
            )
        self.mesh = mesh or sharding_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
        devices = self.mesh.devices.size
        self.batch_size = -(-batch_size // devices) * devices  # a multiple of the device count
        replicated = sharding_lib.replicated(self.mesh)
        batch = sharding_lib.batch_sharding(self.mesh)
        self.params = jax.device_put(params, replicated)
        model = inception.FIDInceptionV3(preprocessing)
        self._fn = jax.jit(
            lambda p, x: model.apply(p, x)["pool"],
            in_shardings=(replicated, batch),
            out_shardings=batch,
        )
        self.feature_dim = inception.FEATURE_DIM
        self.metadata = {
            "network": "inception-v3-2015-12-05 pool_3",
            "weights": fingerprint,
            "preprocessing": preprocessing,
        }

    @classmethod
    def from_file(cls, path, **kwargs) -> InceptionFeatures:
        """From pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (or torch-fidelity's file,
        or the same tensors as .safetensors)."""
        from ldm_jax.convert.inception import load_inception_params
        from ldm_jax.runs import params_fingerprint

        params = load_inception_params(path)
        return cls(params, fingerprint=params_fingerprint(params), **kwargs)

    def __call__(self, images) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"Inception features take uint8[N, H, W, 3] images, got {images.dtype}{list(images.shape)}"
            )
        out = [np.zeros((0, self.feature_dim), np.float32)]
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            pad = self.batch_size - len(chunk)
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            out.append(np.asarray(self._fn(self.params, padded))[: len(chunk)])
        return np.concatenate(out)


def image_files(folder) -> list[pathlib.Path]:
    """The image files directly in `folder`, sorted by name (a `sample --out` folder's grid.png
    is left out: it is not a sample)."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such image folder: {folder}")
    files = sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and p.name != "grid.png" and p.is_file()
    )
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_images(files) -> Iterator[np.ndarray]:
    """uint8[H, W, 3] per file; an unreadable file is a ValueError naming it."""
    from PIL import Image

    for path in files:
        try:
            with Image.open(path) as image:
                yield np.asarray(image.convert("RGB"))
        except (OSError, SyntaxError) as e:
            raise ValueError(f"cannot read image {path}: {e}") from e


def feature_statistics(extractor, images, *, keep_features=True):
    """(FeatureStatistics, float32[N, 2048] features or None) of `images`: a uint8[N, H, W, 3]
    array, or an iterable of uint8[H, W, 3] images (sizes may differ; consecutive images of one
    size are batched together)."""
    stats, kept = FeatureStatistics(), []

    def flush(batch):
        if batch:
            features = extractor(np.stack(batch))
            stats.update(features)
            if keep_features:
                kept.append(features)

    batch = []
    for image in images:
        image = np.asarray(image)
        if batch and (image.shape != batch[0].shape or len(batch) == extractor.batch_size):
            flush(batch)
            batch = []
        batch.append(image)
    flush(batch)
    if stats.num == 0:
        raise ValueError("no images to compute statistics of")
    features = np.concatenate(kept) if keep_features else None
    return stats, features


def check_comparable(reference: dict, metadata: dict, where: str) -> None:
    """A reference made with other Inception weights or preprocessing gives a meaningless FID:
    refuse it, naming the fields. A file without metadata (pytorch-fid's, clean-fid's) is taken
    on trust, with a warning."""
    made = reference.get("metadata") or {}
    if not made:
        logging.warning(
            "%s records no Inception weights or preprocessing; assuming they match", where
        )
        return
    differing = {k: (made.get(k), v) for k, v in metadata.items() if k in made and made.get(k) != v}
    if differing:
        lines = ", ".join(f"{k}: reference {a!r}, here {b!r}" for k, (a, b) in differing.items())
        raise ValueError(f"{where} was made differently, so the FID would not compare: {lines}")


def scores(stats, features, reference: dict, *, kid_subset_size=1000, kid_subsets=100, seed=0):
    """{"fid", "kid", "kid_std", "kid_subset_size", "num_images"} of samples against a reference
    (from `load_statistics`). KID needs the reference's features; its subsets shrink to the
    smaller set when either has fewer than `kid_subset_size` vectors (the estimator stays
    unbiased; its spread grows), and the size used is reported."""
    out = {
        "num_images": int(stats.num),
        "fid": frechet_distance(stats.mu, stats.sigma, reference["mu"], reference["sigma"]),
    }
    if features is not None and reference.get("features") is not None:
        size = min(kid_subset_size, len(features), len(reference["features"]))
        kid, kid_std = kernel_inception_distance(
            features, reference["features"], num_subsets=kid_subsets, subset_size=size, seed=seed
        )
        out.update(kid=kid, kid_std=kid_std, kid_subset_size=size)
    return out


# --- FID of a model trained here, by sampler and NFE ---------------------------------------------


def dataset_reference(config, extractor, *, split="test", num_images=None):
    """(reference statistics dict as `load_statistics` gives, captions list) of the first
    `num_images` examples of `config.data`'s split: the real images FID compares against and the
    captions the samples are drawn for. extractor=None: the captions only (reference None), for
    a run given precomputed reference statistics."""
    from ldm_jax.data.pipeline import load_dataset

    data = load_dataset(config, split)
    total = len(data["caption"])
    n = total if num_images is None else num_images
    if not 2 <= n <= total:
        raise ValueError(f"num_images must be in [2, {total}] (the {split} split), got {n}")
    captions = [str(data["caption"][i]) for i in range(n)]
    if extractor is None:
        return None, captions
    images = (data["image"][i] for i in range(n))
    stats, features = feature_statistics(extractor, images)
    reference = dict(
        mu=stats.mu,
        sigma=stats.sigma,
        num_images=n,
        features=features,
        metadata={**extractor.metadata, "dataset": config.data.name, "split": split},
    )
    return reference, captions


def format_table(rows) -> str:
    clip = any("clip_score" in r for r in rows)
    lines = [
        "| sampler | steps | NFE | FID | KID x 1e3 |"
        + (" CLIP score |" if clip else "")
        + " images | images/s |",
        "|---|---:|---:|---:|---:|" + ("---:|" if clip else "") + "---:|---:|",
    ]
    for r in rows:
        kid = f"{1e3 * r['kid']:.2f} ± {1e3 * r['kid_std']:.2f}" if "kid" in r else "-"
        cells = [r["sampler"], r["steps"], r["nfe"], f"{r['fid']:.2f}", kid]
        if clip:
            cells.append(f"{r['clip_score']:.2f}" if "clip_score" in r else "-")
        cells += [r["num_images"], f"{r['images_per_sec']:.1f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def evaluate_samplers(
    ldm,
    extractor,
    reference: dict,
    prompts: Sequence[str],
    *,
    runs: Sequence[tuple[str, int]],
    guidance_scale: float = 4.0,
    sampler_options: dict | None = None,
    seed: int = 0,
    batch_size: int = 64,
    kid_subset_size: int = 1000,
    clip_scorer=None,
    out_dir=None,
) -> dict:
    """FID (and KID) of `ldm`'s samples for each (sampler, num_steps) in `runs`, one image per
    prompt, image i from seed `seed + i` in every run (paired: the runs differ only by sampler).
    Rows carry the NFE (`samplers.network_evaluations`) so that samplers compare at equal cost.
    With `clip_scorer` (an `ldm_jax.eval.clip_score.ClipScorer`) each row also has the mean CLIP
    score of the samples against their prompts. With `out_dir`: results.json, table.md and a grid
    of each run's first 32 images."""
    from ldm_jax.diffusion.samplers import network_evaluations
    from ldm_jax.images import make_grid, save_png
    from ldm_jax.pipeline import generate

    check_comparable(reference, extractor.metadata, "the reference statistics")
    seeds = [seed + i for i in range(len(prompts))]
    rows = []
    out = pathlib.Path(out_dir) if out_dir is not None else None
    for sampler, steps in runs:
        nfe = network_evaluations(sampler, steps)
        if nfe is None:
            raise ValueError(f"{sampler} cannot run {steps} steps")
        start = time.perf_counter()
        images = generate(
            ldm,
            prompts,
            seed=seeds,
            guidance_scale=guidance_scale,
            num_inference_steps=steps,
            sampler=sampler,
            sampler_options=sampler_options,
            batch_size=batch_size,
        )
        seconds = time.perf_counter() - start
        stats, features = feature_statistics(extractor, images)
        row = dict(sampler=sampler, steps=steps, nfe=nfe, guidance=float(guidance_scale))
        row.update(scores(stats, features, reference, kid_subset_size=kid_subset_size, seed=seed))
        if clip_scorer is not None:
            from ldm_jax.eval.clip_score import summarize

            row.update(summarize(clip_scorer.scores(images, prompts)))
        row["images_per_sec"] = len(images) / seconds
        rows.append(row)
        logging.info("%s %d steps (NFE %d): FID %.3f", sampler, steps, nfe, row["fid"])
        if out is not None:
            save_png(make_grid(images[:32], 8), out / f"grid_{sampler}_{steps}.png", 2)
    table = format_table(rows)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(table + "\n")
        settings = dict(
            guidance_scale=guidance_scale,
            sampler_options=sampler_options or {},
            seed=seed,
            num_images=len(prompts),
            reference=reference.get("metadata", {}),
        )
        (out / "results.json").write_text(
            json.dumps({"settings": settings, "rows": rows}, indent=2, default=str) + "\n"
        )
    return {"rows": rows, "table": table}
