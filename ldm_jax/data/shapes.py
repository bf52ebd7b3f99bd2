"""The embedded `shapes` dataset: procedural text-image pairs, deterministic from a seed.

Each example is one anti-aliased shape on a plain background, with captions that name its
attributes:

  background  black (0,0,0) | white (255,255,255) | gray (128,128,128)
  color       8 named colours (`COLORS`), distinct from each other and from every background
  shape       circle | square | triangle (upright: apex at the top, base at the bottom)
  size        small | large: the shape's extent (circle diameter, square side, triangle base and
              height) as a fraction of the image width: 0.30 | 0.55
  position    center | left | right | top | bottom: the centre of the shape's bounding box at
              (50,50) | (30,50) | (70,50) | (50,30) | (50,70) percent of (width, height), plus a
              uniform jitter of +-3% of the width on each axis

All attributes are drawn uniformly and independently (3 x 8 x 3 x 2 x 5 = 720 combinations). The
coordinate convention is fractions of the image width, x to the right, y downwards; the image is
square.

Held-out concepts (`CONCEPTS`): a shape and a colour that the main splits never contain, for
teaching a trained model something new (LoRA, fine-tuning: experiments/lora/):

  cross       a plus sign: two bars of the shape's extent by a third of it (`HELD_OUT_SHAPES`)
  navy        (0, 0, 128) (`HELD_OUT_COLORS`; >= 128 RGB from every other colour and background)

Their words are in the caption vocabulary (`CAPTION_WORDS`), as a pretrained model's tokenizer
knows words its training images never showed; `generate_examples(..., concept=...)` draws
examples that all have the concept and otherwise the usual attributes (the TFDS configs "cross"
and "navy"; "cross_replay" and "navy_replay" alternate them with examples of the main
distribution). Their names come after the base names in `LABEL_NAMES`, so the labels of the main
splits are unchanged.

Captions (`random_caption`) are drawn from `CAPTION_TEMPLATES` with these probabilities:

  0.20  the canonical caption (`CANONICAL_TEMPLATE`)
  0.20  exactly `a {color} {shape}`, so that short prompts are in distribution
  0.50  paraphrases and shortened forms that keep both colour and shape
  0.05  forms that drop the colour
  0.05  forms that drop the shape (`a {color} shape ...`)

so 90% of captions name both colour and shape. The article is always "a" (also "a orange"), which
keeps the short form exactly `a {color} {shape}`. Every caption uses only the words in
`CAPTION_WORDS`.

Pure numpy (no tensorflow): the TFDS builder in `shapes_tfds.py` and the prompt-adherence analyzer
in
`ldm_jax.eval.adherence` both build on this module.
"""

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
# Colours from Sasha Trubetskoy's "20 distinct colours" palette.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 75),
    "green": (60, 180, 75),
    "blue": (0, 130, 200),
    "yellow": (255, 225, 25),
    "orange": (245, 130, 48),
    "purple": (145, 30, 180),
    "cyan": (70, 240, 240),
    "magenta": (240, 50, 230),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Held out of the main splits (see the module docstring).
HELD_OUT_COLORS: dict[str, tuple[int, int, int]] = {"navy": (0, 0, 128)}
HELD_OUT_SHAPES: tuple[str, ...] = ("cross",)
ALL_COLORS = COLORS | HELD_OUT_COLORS
ALL_SHAPES = SHAPES + HELD_OUT_SHAPES
# Concept name -> (attribute, value) that its examples all have.
CONCEPTS: dict[str, tuple[str, str]] = {
    **{name: ("color", name) for name in HELD_OUT_COLORS},
    **{name: ("shape", name) for name in HELD_OUT_SHAPES},
}
# Extent as a fraction of the image width.
SIZES: dict[str, float] = {"small": 0.30, "large": 0.55}
# Centre (x, y) as fractions of (width, height).
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "left": (0.3, 0.5),
    "right": (0.7, 0.5),
    "top": (0.5, 0.3),
    "bottom": (0.5, 0.7),
}
JITTER = 0.03  # uniform +-JITTER (fraction of the width) added to the centre on each axis
SUPERSAMPLE = 4  # 4x4 samples per pixel for anti-aliasing

# Attribute name -> the names the main splits draw from.
BASE_NAMES: dict[str, tuple[str, ...]] = {
    "background": tuple(BACKGROUNDS),
    "color": tuple(COLORS),
    "shape": SHAPES,
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
}
# Attribute name -> the ordered names its integer label indexes: the base names, then the
# held-out ones.
LABEL_NAMES: dict[str, tuple[str, ...]] = {
    **BASE_NAMES,
    "color": tuple(ALL_COLORS),
    "shape": ALL_SHAPES,
}

CANONICAL_TEMPLATE = "a {size} {color} {shape} on a {background} background at the {position}"
SHORT_TEMPLATE = "a {color} {shape}"
# (template, probability); the probabilities sum to 1 (see the module docstring).
CAPTION_TEMPLATES: tuple[tuple[str, float], ...] = (
    (CANONICAL_TEMPLATE, 0.20),
    (SHORT_TEMPLATE, 0.20),
    # Both colour and shape (0.50 in all).
    ("a {color} {shape} at the {position}", 0.06),
    ("{size} {color} {shape}, {background} background", 0.06),
    ("a {shape} that is {color}", 0.06),
    ("a {size} {color} {shape}", 0.06),
    ("a {color} {shape} on a {background} background", 0.06),
    ("{color} {shape}", 0.05),
    ("a {background} background with a {size} {color} {shape} at the {position}", 0.05),
    ("a {size} {shape} that is {color}, at the {position}", 0.05),
    ("a {color} {shape} at the {position} of a {background} background", 0.05),
    # No colour (0.05).
    ("a {size} {shape} on a {background} background", 0.025),
    ("a {shape} at the {position}", 0.025),
    # No shape (0.05).
    ("a {color} shape on a {background} background", 0.025),
    ("a {size} {color} shape at the {position}", 0.025),
)
_TEMPLATE_PROBS = np.array([p for _, p in CAPTION_TEMPLATES])
assert abs(_TEMPLATE_PROBS.sum() - 1.0) < 1e-9

# Every word a caption can contain (the fixed words of the templates plus all attribute names).
CAPTION_WORDS: frozenset[str] = frozenset(
    {"a", "on", "background", "at", "the", "that", "is", "with", "of", "shape"}
    | {name for names in LABEL_NAMES.values() for name in names}
)


def check_concept(concept: str | None) -> None:
    if concept is not None and concept not in CONCEPTS:
        raise ValueError(f"unknown shapes concept {concept!r}; valid: {', '.join(CONCEPTS)}")


def sample_attributes(rng: np.random.Generator, concept: str | None = None) -> dict[str, Any]:
    """One example's attributes: names, and `center`: jittered (x, y), fractions of the width.
    With a held-out `concept` (`CONCEPTS`), its attribute is that concept (the same draws are
    made, so the rest is what the seed gives without it)."""
    attrs = {key: str(names[rng.integers(len(names))]) for key, names in BASE_NAMES.items()}
    if concept is not None:
        check_concept(concept)
        key, value = CONCEPTS[concept]
        attrs[key] = value
    x, y = POSITIONS[attrs["position"]]
    jitter = rng.uniform(-JITTER, JITTER, size=2)
    attrs["center"] = (float(x + jitter[0]), float(y + jitter[1]))
    return attrs


def shape_coverage(
    shape: str,
    center: tuple[float, float],
    extent: float,
    image_size: int,
    supersample: int = SUPERSAMPLE,
) -> np.ndarray:
    """Fraction of each pixel covered by the shape: float32[image_size, image_size] in [0, 1].

    `center` (x, y) and `extent` are fractions of the image width; estimated by sampling a
    `supersample` x `supersample` grid inside every pixel.
    """
    if shape not in ALL_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; valid: {ALL_SHAPES}")
    n = image_size * supersample
    # Sample points at the centres of the sub-pixels, in fractions of the width.
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n
    cx, cy = center
    half = extent / 2
    dx = coords[None, :] - cx  # [1, n]
    dy = coords[:, None] - cy  # [n, 1]
    if shape == "circle":
        inside = dx * dx + dy * dy <= half * half
    elif shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "cross":  # Two bars, extent long and extent / 3 wide, crossing at the centre.
        bar = half / 3
        inside = ((np.abs(dx) <= half) & (np.abs(dy) <= bar)) | (
            (np.abs(dx) <= bar) & (np.abs(dy) <= half)
        )
    else:  # Upright triangle: half-width grows from 0 at the apex (dy = -half) to half at the base.
        inside = (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    return inside.reshape(image_size, supersample, image_size, supersample).mean(
        axis=(1, 3), dtype=np.float32
    )


def render(attrs: Mapping[str, Any], image_size: int = 32) -> np.ndarray:
    """The image described by `attrs` (see `sample_attributes`): uint8[size, size, 3]."""
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    coverage = shape_coverage(attrs["shape"], attrs["center"], SIZES[attrs["size"]], image_size)[
        ..., None
    ]
    background = np.asarray(BACKGROUNDS[attrs["background"]], np.float32)
    color = np.asarray(ALL_COLORS[attrs["color"]], np.float32)
    image = background + coverage * (color - background)
    return np.rint(image).astype(np.uint8)


def canonical_caption(attrs: Mapping[str, Any]) -> str:
    """`a {size} {color} {shape} on a {background} background at the {position}`."""
    return CANONICAL_TEMPLATE.format(**attrs)


def random_caption(attrs: Mapping[str, Any], rng: np.random.Generator) -> str:
    """One caption drawn from `CAPTION_TEMPLATES` with their probabilities."""
    template, _ = CAPTION_TEMPLATES[rng.choice(len(CAPTION_TEMPLATES), p=_TEMPLATE_PROBS)]
    return template.format(**attrs)


def labels(attrs: Mapping[str, Any]) -> dict[str, int]:
    """Integer labels: index of each attribute's name in `LABEL_NAMES[attribute]`."""
    return {key: names.index(attrs[key]) for key, names in LABEL_NAMES.items()}


def generate_examples(
    seed: int,
    num_examples: int,
    image_size: int = 32,
    concept: str | None = None,
    concept_every: int = 1,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields `(index, example)`; the same seed gives the same bytes. `concept`: every
    `concept_every`-th example (from the first) has this held-out concept (`CONCEPTS`), the
    others are drawn as in the main splits (2: half of them, to replay what a model knew while
    it learns the concept).

    example: image uint8[H, W, 3], caption (a random paraphrase), canonical_caption, and the integer
    labels background, color, shape, size, position (see `LABEL_NAMES`).
    """
    check_concept(concept)
    if concept_every < 1:
        raise ValueError(f"concept_every must be >= 1, got {concept_every}")
    rng = np.random.default_rng(seed)
    for index in range(num_examples):
        attrs = sample_attributes(rng, concept if index % concept_every == 0 else None)
        yield (
            index,
            {
                "image": render(attrs, image_size),
                "caption": random_caption(attrs, rng),
                "canonical_caption": canonical_caption(attrs),
                **labels(attrs),
            },
        )
