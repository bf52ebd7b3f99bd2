"""Prompt adherence: the analyzer on the dataset's own images, the prompt set, score, table."""

import collections

import numpy as np
import pytest

from ldm_jax.data import shapes
from ldm_jax.eval import adherence


@pytest.mark.parametrize("image_size,num_examples", [(32, 1000), (64, 200)])
def test_analyzer_reads_back_the_dataset(image_size, num_examples):
    errors = collections.Counter()
    for _, example in shapes.generate_examples(11, num_examples, image_size):
        analysis = adherence.analyze(example["image"])
        for key, names in shapes.LABEL_NAMES.items():
            errors[key] += analysis[key] != names[example[key]]
    # The images are noise-free renders of exactly the analyzer's model (the positions are 0.2 apart
    # with +-0.03 jitter; sizes differ 1.8x; the colours >= 100 RGB apart), so a correct analyzer
    # makes no mistakes; >= 99% leaves room for a rare edge case (e.g. a large shape clipped by the
    # border) without hiding a real regression, which shows up as several percent.
    for key in shapes.LABEL_NAMES:
        assert errors[key] <= 0.01 * num_examples, (key, errors)


@pytest.mark.parametrize("concept", list(shapes.CONCEPTS))
def test_analyzer_reads_back_the_held_out_concepts(concept):
    for _, example in shapes.generate_examples(13, 300, 32, concept):
        analysis = adherence.analyze(example["image"])
        assert all(analysis[k] == n[example[k]] for k, n in shapes.LABEL_NAMES.items()), analysis


def test_concept_prompts():
    cross = adherence.adherence_prompts(concepts=["cross"])
    assert [r["prompt"] for r in cross[:8]] == [f"a {c} cross" for c in shapes.COLORS]
    assert len(cross) == 8 + 24 and all(r["shape"] == "cross" for r in cross)
    navy = adherence.adherence_prompts(num_canonical=6, concepts=["navy"])
    assert {r["shape"] for r in navy} == set(shapes.SHAPES) and len(navy) == 3 + 6
    both = adherence.adherence_prompts(num_canonical=2, concepts=["cross", "navy"])
    assert [r["prompt"] for r in both][:1] == ["a navy cross"] and len(both) == 3
    with pytest.raises(ValueError, match="more than one color"):
        adherence.adherence_prompts(concepts=["navy", "navy"])
    with pytest.raises(ValueError, match="unknown shapes concept"):
        adherence.adherence_prompts(concepts=["star"])


def test_analyzer_tolerates_mild_blur():
    # Model samples are softer than the data: blur by a 3x3 binomial kernel (sigma ~0.7 px).
    kernel = np.array([1.0, 2.0, 1.0]) / 4
    correct = collections.Counter()
    examples = [example for _, example in shapes.generate_examples(12, 300, 32)]
    for example in examples:
        image = np.pad(example["image"].astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
        image = sum(k * image[i : i + 32] for i, k in enumerate(kernel))
        image = sum(k * image[:, i : i + 32] for i, k in enumerate(kernel))
        analysis = adherence.analyze(np.rint(image).astype(np.uint8))
        for key in ("color", "shape", "position"):
            correct[key] += analysis[key] == shapes.LABEL_NAMES[key][example[key]]
    assert all(correct[key] >= 0.97 * len(examples) for key in correct), correct


def test_empty_and_degenerate_images():
    for image in (
        np.zeros((32, 32, 3), np.uint8),
        np.full((32, 32, 3), 255, np.uint8),
        np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8),
    ):
        analysis = adherence.analyze(image)
        assert analysis["background"] in shapes.BACKGROUNDS
    empty = adherence.analyze(np.full((32, 32, 3), 128, np.uint8))
    assert empty["background"] == "gray" and empty["shape"] == empty["color"] == "none"
    one_pixel = np.zeros((32, 32, 3), np.uint8)
    one_pixel[5, 5] = 255
    assert adherence.analyze(one_pixel)["shape"] == "none"
    with pytest.raises(ValueError, match="RGB"):
        adherence.analyze(np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        adherence.analyze(np.zeros((32, 32, 3), np.float32))


def test_prompts():
    records = adherence.adherence_prompts()
    assert records == adherence.adherence_prompts()  # Deterministic.
    short, canonical = records[:24], records[24:]
    assert len(canonical) == 24
    assert {(r["color"], r["shape"]) for r in short} == {
        (c, s) for c in shapes.COLORS for s in shapes.SHAPES
    }
    assert all(
        r["prompt"] == f"a {r['color']} {r['shape']}" and r["position"] is None for r in short
    )
    assert {(r["color"], r["shape"]) for r in canonical} == {
        (r["color"], r["shape"]) for r in short
    }
    for r in canonical:
        assert r["prompt"] == shapes.canonical_caption(r)
        assert r["position"] in shapes.POSITIONS and r["background"] in shapes.BACKGROUNDS
    assert len(adherence.adherence_prompts(num_canonical=5)) == 29
    assert adherence.adherence_prompts(seed=1)[24:] != canonical


def test_score_and_table():
    records = [
        {"color": "red", "shape": "circle", "position": None},
        {"color": "blue", "shape": "square", "position": None},
        {"color": "green", "shape": "triangle", "position": "left"},
        {"color": "cyan", "shape": "circle", "position": "top"},
    ]
    analyses = [
        {"color": "red", "shape": "circle", "position": "center"},
        {"color": "blue", "shape": "circle", "position": "center"},
        {"color": "purple", "shape": "triangle", "position": "left"},
        {"color": "cyan", "shape": "circle", "position": "none"},
    ]
    result = adherence.score(analyses, records)
    assert result["n"] == 4 and result["n_position"] == 2
    assert result["color"] == 0.75 and result["shape"] == 0.75
    assert result["color_and_shape"] == 0.5 and result["position"] == 0.5
    assert result["size"] is None and result["n_size"] == 0
    with pytest.raises(ValueError, match="3 analyses but 4 records"):
        adherence.score(analyses[:3], records)

    no_position = adherence.score(analyses[:2], records[:2])
    table = adherence.format_table([{"guidance": 1.0, **result}, {"guidance": 7.5, **no_position}])
    assert table.splitlines() == [
        "| guidance | n | color | shape | color+shape | position |",
        "|---:|---:|---:|---:|---:|---:|",
        "| 1 | 4 | 75.0% | 75.0% | 50.0% | 50.0% |",
        "| 7.5 | 2 | 100.0% | 50.0% | 50.0% | - |",
    ]
