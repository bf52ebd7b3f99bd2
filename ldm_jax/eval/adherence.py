"""Prompt adherence on the `shapes` dataset: a deterministic image analyzer, fixed prompts, scoring.

`analyze` reads back the attributes of a shapes-like image (background, colour, shape, position,
size) with plain numpy, so a sample from a model trained on `shapes` can be checked against its prompt:

1. background: the named background nearest to the median colour of the 1-pixel border;
2. foreground: pixels farther than `FOREGROUND_THRESHOLD` from that background colour;
3. colour: the named colour (the held-out navy included) nearest to the median of the
   foreground's core pixels (the strongest quarter, so that anti-aliased edges, which mix in the
   background, do not pull the median);
4. coverage: each pixel's fraction of foreground colour, by projecting (pixel - background) onto
   (colour - background); from it the area and the centroid, which are robust to blur and noise;
5. shape: the template (circle, square, upright triangle, and the held-out cross) of the same area
   and centroid that has the highest soft IoU with the coverage (an upright triangle's centroid
   lies h/6 below its box centre), each template also tried blurred (`TEMPLATE_BLURS`) since
   model samples are often soft;
6. position: the named position nearest to the fitted shape's box centre; size: the named extent
   nearest (in log scale) to the fitted extent.

With no foreground (fewer than `MIN_FOREGROUND_PIXELS`), colour, shape, position and size are
"none". `evaluate` samples the prompt set from a model (through `ldm_jax.pipeline.generate`) and
scores it; it is what `ldm-jax eval adherence` runs.
"""

import itertools
import json
import math
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ldm_jax.data import shapes

# RGB distance (0..441) above which a pixel counts as foreground. The closest colour/background pair
# (green on gray) is ~100 apart; half of that keeps anti-aliased edges of every pair out of the
# background and leaves room for noise in generated images.
FOREGROUND_THRESHOLD = 50.0
# Coverage below this is treated as background noise (it would otherwise add up over the whole
# image).
MIN_COVERAGE = 0.2
MIN_FOREGROUND_PIXELS = 4
NONE = "none"


def _nearest(value: np.ndarray, table: Mapping[str, Any]) -> tuple[str, float]:
    """Name in `table` whose value is nearest (euclidean) to `value`, and the distance."""
    names = list(table)
    values = np.asarray([table[name] for name in names], np.float32)
    distances = np.linalg.norm(values - np.asarray(value, np.float32), axis=-1)
    best = int(np.argmin(distances))
    return names[best], float(distances[best])


def _fit_center(shape: str, centroid: tuple[float, float], extent: float) -> tuple[float, float]:
    """Box centre of a shape with this centroid; only the upright triangle's differs (extent/6)."""
    x, y = centroid
    return (x, y - extent / 6) if shape == "triangle" else (x, y)


def _blur_matrix(size: int, sigma: float) -> np.ndarray:
    """float32[size, size] Gaussian blur along one axis (rows normalized); B @ x @ B.T blurs x."""
    offsets = np.arange(size, dtype=np.float32)
    weights = np.exp(-0.5 * ((offsets[:, None] - offsets[None, :]) / sigma) ** 2)
    return weights / weights.sum(axis=1, keepdims=True)


# Template blurs (pixels) tried for every shape: generated images are often softer than the data,
# and
# a sharp square's template fits a blurred square worse than a circle's does at 32x32.
TEMPLATE_BLURS = (0.0, 0.6, 1.0, 1.4)

# Shape area as a fraction of extent**2.
_AREA_FACTOR = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9}


def analyze(image: np.ndarray) -> dict[str, Any]:
    """Reads the attributes of a shapes-like image: uint8[H, W, 3] (square) -> dict.

    Keys: background, color, shape, position, size (names from `ldm_jax.data.shapes`, or "none" for
    an
    empty foreground) and diagnostics: foreground_fraction (coverage area / image area), color_rgb,
    color_distance (RGB distance of the foreground colour to the named one), shape_iou (per shape),
    center (x, y in fractions of the width), extent (fraction of the width).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    height, width = image.shape[:2]
    if height != width or height < 8:
        raise ValueError(f"expected a square image of at least 8x8 pixels, got {height}x{width}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels (0..255), got {image.dtype}")
    pixels = image.astype(np.float32)

    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background, _ = _nearest(np.median(border, axis=0), shapes.BACKGROUNDS)
    background_rgb = np.asarray(shapes.BACKGROUNDS[background], np.float32)

    distance = np.linalg.norm(pixels - background_rgb, axis=-1)  # [H, W]
    foreground = distance > FOREGROUND_THRESHOLD
    result: dict[str, Any] = {
        "background": background,
        "color": NONE,
        "shape": NONE,
        "position": NONE,
        "size": NONE,
        "foreground_fraction": float(foreground.mean()),
        "color_rgb": None,
        "color_distance": None,
        "shape_iou": {},
        "center": None,
        "extent": None,
    }
    if foreground.sum() < MIN_FOREGROUND_PIXELS:
        return result

    # Core pixels: the quarter of the foreground farthest from the background: the shape's interior,
    # even in a small blurred shape whose every pixel mixes in some background.
    core = foreground & (distance >= np.percentile(distance[foreground], 75))
    color_rgb = np.median(pixels[core], axis=0)
    # Every colour and shape the analyzer knows, the held-out ones included: a model that draws
    # a cross for "a red circle" is wrong, and one taught "navy" must be read as navy.
    color, color_distance = _nearest(color_rgb, shapes.ALL_COLORS)

    # Soft coverage: how much of the foreground colour each pixel holds (anti-aliasing, blur).
    direction = color_rgb - background_rgb
    coverage = (pixels - background_rgb) @ direction / max(float(direction @ direction), 1e-6)
    coverage = np.clip(coverage, 0.0, 1.0)
    coverage[coverage < MIN_COVERAGE] = 0.0
    area = float(coverage.sum())
    if area < MIN_FOREGROUND_PIXELS / 2:  # E.g. foreground pixels whose colour opposes the mean.
        return result
    coords = (np.arange(width, dtype=np.float32) + 0.5) / width
    centroid = (
        float((coverage.sum(axis=0) * coords).sum() / area),
        float((coverage.sum(axis=1) * coords).sum() / area),
    )
    area_fraction = area / (width * height)

    ious, fits = {}, {}
    for shape in shapes.ALL_SHAPES:
        extent = math.sqrt(area_fraction / _AREA_FACTOR[shape])
        center = _fit_center(shape, centroid, extent)
        sharp = shapes.shape_coverage(shape, center, extent, width, supersample=2)
        best = 0.0
        for sigma in TEMPLATE_BLURS:
            template = sharp
            if sigma > 0:
                blur = _blur_matrix(width, sigma)
                template = blur @ sharp @ blur.T
                template[template < MIN_COVERAGE] = 0.0  # As the coverage itself.
            iou = np.minimum(coverage, template).sum() / np.maximum(coverage, template).sum()
            best = max(best, float(iou))
        ious[shape] = best
        fits[shape] = (center, extent)
    shape = max(ious, key=ious.get)
    center, extent = fits[shape]
    position, _ = _nearest(center, shapes.POSITIONS)
    size, _ = _nearest([math.log(extent)], {k: [math.log(v)] for k, v in shapes.SIZES.items()})

    result.update(
        color=color,
        shape=shape,
        position=position,
        size=size,
        foreground_fraction=area_fraction,
        color_rgb=tuple(float(c) for c in color_rgb),
        color_distance=color_distance,
        shape_iou=ious,
        center=center,
        extent=extent,
    )
    return result


ATTRIBUTES = ("color", "shape", "size", "background", "position")


def adherence_prompts(
    num_canonical: int = 24, seed: int = 0, concepts: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """The fixed prompt set: records with prompt, kind, and the attributes (None where unspecified).

    First every colour x shape as `a {color} {shape}` (kind "short", 24 records), then
    `num_canonical`
    canonical captions (kind "canonical") that cycle through the colour x shape pairs in a seeded
    order, with size, background and position drawn from `np.random.default_rng(seed)`.

    `concepts`: held-out concepts (`shapes.CONCEPTS`) that replace their attribute's names:
    ("cross",) gives the 8 colours x cross, ("navy",) navy x the 3 shapes, ("cross", "navy")
    the one pair navy cross.
    """
    if num_canonical < 0:
        raise ValueError(f"num_canonical must be >= 0, got {num_canonical}")
    names = {"color": tuple(shapes.COLORS), "shape": shapes.SHAPES}
    for concept in concepts:
        shapes.check_concept(concept)
        key, value = shapes.CONCEPTS[concept]
        if names[key] != shapes.BASE_NAMES[key]:
            raise ValueError(f"concepts {list(concepts)}: more than one {key}")
        names[key] = (value,)
    pairs = list(itertools.product(names["color"], names["shape"]))
    records = []
    for color, shape in pairs:
        attrs = dict.fromkeys(ATTRIBUTES, None) | {"color": color, "shape": shape}
        records.append({"prompt": shapes.SHORT_TEMPLATE.format(**attrs), "kind": "short", **attrs})

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pairs))
    for i in range(num_canonical):
        color, shape = pairs[order[i % len(pairs)]]
        attrs = {
            "color": color,
            "shape": shape,
            **{
                key: str(shapes.LABEL_NAMES[key][rng.integers(len(shapes.LABEL_NAMES[key]))])
                for key in ("size", "background", "position")
            },
        }
        records.append({"prompt": shapes.canonical_caption(attrs), "kind": "canonical", **attrs})
    return records


def score(analyses: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]]) -> dict:
    """Accuracy (fraction in [0, 1], or None when no record specifies the attribute) and counts.

    Keys: n; color, shape, color_and_shape, size, background, position; n_<key> for each (how many
    records specify it; color_and_shape counts records that specify both).
    """
    if len(analyses) != len(records):
        raise ValueError(f"{len(analyses)} analyses but {len(records)} records")
    out: dict[str, Any] = {"n": len(records)}

    def accuracy(key: str, attributes: tuple[str, ...]) -> None:
        hits = [
            all(analysis.get(a) == record[a] for a in attributes)
            for analysis, record in zip(analyses, records)
            if all(record.get(a) is not None for a in attributes)
        ]
        out[key] = float(np.mean(hits)) if hits else None
        out[f"n_{key}"] = len(hits)

    for attribute in ATTRIBUTES:
        accuracy(attribute, (attribute,))
    accuracy("color_and_shape", ("color", "shape"))
    return out


_TABLE_COLUMNS = (
    ("color", "color"),
    ("shape", "shape"),
    ("color_and_shape", "color+shape"),
    ("position", "position"),
)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table, one row per guidance scale: rows are `score(...)` outputs plus `guidance`."""

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    lines = [
        "| guidance | n | " + " | ".join(title for _, title in _TABLE_COLUMNS) + " |",
        "|---:|---:|" + "---:|" * len(_TABLE_COLUMNS),
    ]
    for row in rows:
        cells = [f"{row['guidance']:g}", str(row["n"])]
        cells += [percent(row.get(key)) for key, _ in _TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate(
    ldm,
    *,
    guidance_scales: Sequence[float] = (0.0, 4.0),
    num_per_prompt: int = 8,
    num_steps: int = 25,
    sampler: str = "ddim",
    sampler_options: dict | None = None,
    seed: int = 0,
    batch_size: int = 64,
    num_canonical: int = 24,
    concepts: Sequence[str] = (),
    out_dir: str | pathlib.Path | None = None,
) -> dict:
    """Sample `num_per_prompt` images for every prompt of `adherence_prompts` (of `concepts`,
    if given), at each guidance scale, analyze them and score them. The same seeds are used at
    every scale (paired).

    Returns {"rows": [score + guidance + images_per_sec], "table": markdown}; with `out_dir`,
    also writes table.md, results.json and one grid per scale (rows: prompts, columns: seeds).
    """
    from ldm_jax.images import make_grid, save_png
    from ldm_jax.pipeline import generate

    if any(0 < w < 1 for w in guidance_scales):
        raise ValueError(
            f"guidance scales in (0, 1) are not supported, got {list(guidance_scales)}: 0 is the "
            "unconditional model, and generate() runs the conditional one for w <= 1 (diffusers)"
        )
    records = adherence_prompts(num_canonical=num_canonical, seed=seed, concepts=concepts)
    expanded = [r for r in records for _ in range(num_per_prompt)]
    prompts = [r["prompt"] for r in expanded]
    seeds = [seed + i for i in range(len(prompts))]
    rows = []
    out = pathlib.Path(out_dir) if out_dir is not None else None
    for scale in guidance_scales:
        start = time.perf_counter()
        # Guidance 0 is the unconditional model: the empty prompt (what classifier-free
        # guidance's w = 0 gives). generate() follows diffusers, where w <= 1 means conditional.
        images = generate(
            ldm,
            prompts if scale != 0 else [""] * len(prompts),
            seed=seeds,
            guidance_scale=max(scale, 1.0),
            num_inference_steps=num_steps,
            sampler=sampler,
            sampler_options=sampler_options,
            batch_size=batch_size,
        )
        seconds = time.perf_counter() - start
        row = {
            "guidance": float(scale),
            **score([analyze(im) for im in images], expanded),
            "images_per_sec": len(images) / seconds,
        }
        rows.append(row)
        if out is not None:
            save_png(
                make_grid(images, ncols=num_per_prompt), out / f"grid_guidance_{scale:g}.png", 2
            )
    table = format_table(rows)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(table + "\n")
        settings = dict(
            num_per_prompt=num_per_prompt,
            num_steps=num_steps,
            sampler=sampler,
            sampler_options=sampler_options or {},
            seed=seed,
            num_canonical=num_canonical,
            concepts=list(concepts),
        )
        (out / "results.json").write_text(
            json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n"
        )
    return {"rows": rows, "table": table}
