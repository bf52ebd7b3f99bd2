"""The embedded shapes dataset: determinism, captions, rendered geometry, and the TFDS builder."""

import re

import numpy as np
import pytest

from ldm_jax.data import shapes


def _examples(seed, n, image_size=32):
    return [example for _, example in shapes.generate_examples(seed, n, image_size)]


def test_same_seed_same_bytes_different_seed_different():
    a, b, c = _examples(3, 50), _examples(3, 50), _examples(4, 50)
    for x, y in zip(a, b):
        assert x["image"].tobytes() == y["image"].tobytes()
        assert x["caption"] == y["caption"] and x["canonical_caption"] == y["canonical_caption"]
    assert any(x["image"].tobytes() != z["image"].tobytes() for x, z in zip(a, c))
    assert [x["caption"] for x in a] != [z["caption"] for z in c]


def test_example_fields():
    keys, examples = zip(*shapes.generate_examples(0, 5, 64))
    assert keys == tuple(range(5))
    for example in examples:
        assert example["image"].shape == (64, 64, 3) and example["image"].dtype == np.uint8
        for key, names in shapes.LABEL_NAMES.items():
            assert 0 <= example[key] < len(names)


def _alternation(names):
    return "(" + "|".join(names) + ")"


def test_captions():
    canonical = re.compile(
        "a {size} {color} {shape} on a {background} background at the {position}".format(
            **{key: _alternation(names) for key, names in shapes.LABEL_NAMES.items()}
        )
    )
    examples = _examples(0, 2000)
    for example in examples:
        match = canonical.fullmatch(example["canonical_caption"])
        assert match, example["canonical_caption"]
        # The caption's words are the labels' names.
        names = [shapes.LABEL_NAMES[key][example[key]] for key in ("size", "color", "shape")]
        assert list(match.groups()[:3]) == names
        assert set(example["caption"].replace(",", "").split()) <= shapes.CAPTION_WORDS
    captions = [example["caption"] for example in examples]
    short = [
        example
        for example in examples
        if example["caption"]
        == "a {} {}".format(
            shapes.LABEL_NAMES["color"][example["color"]],
            shapes.LABEL_NAMES["shape"][example["shape"]],
        )
    ]
    # 2,000 draws: the expected frequencies are 20% / 20% / 90%; the bounds are > 5 sigma wide.
    assert 0.14 < len(short) / len(examples) < 0.26
    assert 0.14 < np.mean([c == e["canonical_caption"] for c, e in zip(captions, examples)]) < 0.26
    both = np.mean(
        [
            shapes.LABEL_NAMES["color"][e["color"]] in e["caption"]
            and shapes.LABEL_NAMES["shape"][e["shape"]] in e["caption"]
            for e in examples
        ]
    )
    assert 0.85 < both < 0.95
    assert len(set(captions)) > 500  # Paraphrases, not a handful of strings.


@pytest.mark.parametrize(
    "image_size,concept", [(32, None), (64, None), (32, "cross"), (64, "navy")]
)
def test_rendered_geometry(image_size, concept):
    rng = np.random.default_rng(0)
    for _ in range(60):
        attrs = shapes.sample_attributes(rng, concept)
        image = shapes.render(attrs, image_size).astype(np.float32)
        color = np.asarray(shapes.ALL_COLORS[attrs["color"]], np.float32)
        background = np.asarray(shapes.BACKGROUNDS[attrs["background"]], np.float32)
        assert np.all(image[0, 0] == background)  # Corners are never covered.
        inside = np.all(image == color, axis=-1)  # Fully covered pixels.
        partly = ~np.all(image == background, axis=-1)
        # Coverage area from the blend (exact for anti-aliased edges), vs. the shape's area.
        coverage = ((image - background) @ (color - background)) / (
            (color - background) @ (color - background)
        )
        extent = shapes.SIZES[attrs["size"]]
        factor = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9}
        expected = extent**2 * factor[attrs["shape"]]
        area = coverage.sum() / image_size**2
        assert area == pytest.approx(expected, rel=0.08), attrs
        assert inside.sum() > 0.5 * expected * image_size**2
        assert partly.sum() < 1.6 * expected * image_size**2 + 4 * image_size
        # The box centre of the covered pixels is the jittered centre, near the named position.
        ys, xs = np.nonzero(inside)
        box_center = np.array([xs.min() + xs.max() + 1, ys.min() + ys.max() + 1]) / (2 * image_size)
        assert np.allclose(box_center, attrs["center"], atol=1.5 / image_size), attrs
        assert np.allclose(attrs["center"], shapes.POSITIONS[attrs["position"]], atol=shapes.JITTER)


def test_held_out_concepts_are_only_where_asked():
    base = _examples(5, 1500)
    held_out = {
        k: set(range(len(shapes.BASE_NAMES[k]), len(n))) for k, n in shapes.LABEL_NAMES.items()
    }
    assert held_out["color"] and held_out["shape"]
    assert not any(e[k] in held_out[k] for e in base for k in held_out)  # never in the base data
    for concept, (key, value) in shapes.CONCEPTS.items():
        examples = [e for _, e in shapes.generate_examples(5, 200, 32, concept)]
        assert all(shapes.LABEL_NAMES[key][e[key]] == value for e in examples)
        # The same draws as without the concept: every other attribute is the base example's.
        for e, b in zip(examples, base):
            assert all(e[k] == b[k] for k in shapes.LABEL_NAMES if k != key)
        named = [e["caption"] for e in examples if value in e["caption"]]
        assert len(named) > 0.8 * len(examples)  # 90% of templates name colour and shape
        assert all(set(c.replace(",", "").split()) <= shapes.CAPTION_WORDS for c in named)
    # Replay data: every second example has the concept, the others are the base examples.
    mixed = [e for _, e in shapes.generate_examples(5, 40, 32, "cross", concept_every=2)]
    cross = shapes.LABEL_NAMES["shape"].index("cross")
    assert [e["shape"] == cross for e in mixed] == [i % 2 == 0 for i in range(40)]
    assert all(mixed[i]["color"] == base[i]["color"] for i in range(40))
    with pytest.raises(ValueError, match="unknown shapes concept 'star'; valid: navy, cross"):
        next(shapes.generate_examples(0, 1, 32, "star"))


def test_triangle_is_upright():
    attrs = {
        "background": "black",
        "color": "red",
        "shape": "triangle",
        "size": "large",
        "position": "center",
        "center": (0.5, 0.5),
    }
    widths = (shapes.render(attrs, 64)[..., 0] > 0).sum(axis=1)
    rows = np.nonzero(widths)[0]
    assert widths[rows[-1]] > 30 and widths[rows[0]] <= 3  # Wide base at the bottom, apex at top.


def test_render_is_fast():
    import time

    start = time.perf_counter()
    for _ in shapes.generate_examples(0, 2000, 32):
        pass
    # 25k images should take well under 20 s; 2k under 2 s leaves a wide margin on a slow CI box.
    assert time.perf_counter() - start < 2.0


def test_tfds_concept_configs(tmp_path):
    shapes_tfds = pytest.importorskip("ldm_jax.data.shapes_tfds")
    data = shapes_tfds.load_split("test", data_dir=str(tmp_path), config_name="navy")
    navy = shapes.LABEL_NAMES["color"].index("navy")
    assert data["image"].shape == (128, 32, 32, 3) and np.all(data["color"] == navy)
    expected = [
        e for _, e in shapes.generate_examples(shapes_tfds.SPLIT_SEEDS["test"], 4, 32, "navy")
    ]
    assert all(np.array_equal(data["image"][i], e["image"]) for i, e in enumerate(expected))


def test_tfds_builder_smoke(tmp_path):
    shapes_tfds = pytest.importorskip("ldm_jax.data.shapes_tfds")
    for split, count in (("train", 512), ("test", 128)):
        data = shapes_tfds.load_split(split, data_dir=str(tmp_path), config_name="smoke")
        assert data["image"].shape == (count, 32, 32, 3) and data["image"].dtype == np.uint8
        assert len(data["caption"]) == len(data["canonical_caption"]) == count
        assert isinstance(data["caption"][0], str)
        for key, names in shapes.LABEL_NAMES.items():
            assert data[key].dtype == np.int32 and data[key].shape == (count,)
            # Labels agree with the canonical caption.
            for label, caption in zip(data[key][:50], data["canonical_caption"][:50]):
                assert f" {names[label]} " in f" {caption} "
        # Stored in generation order: identical to the generator with the split's seed.
        expected = _examples(shapes_tfds.SPLIT_SEEDS[split], 8)
        for i, example in enumerate(expected):
            assert np.array_equal(data["image"][i], example["image"])
            assert data["caption"][i] == example["caption"]
    # A second load reuses the prepared files.
    again = shapes_tfds.load_split("test", data_dir=str(tmp_path), config_name="smoke")
    assert np.array_equal(again["image"], data["image"])
