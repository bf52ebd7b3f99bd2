"""Tokenizers: byte and word round trips, padding, truncation and unknown-word warnings, CLIP
known answer, bad names and vocabularies."""

import logging

import numpy as np
import pytest

from ldm_jax.data import tokenizers


def test_byte_round_trip_and_padding():
    tok = tokenizers.get_tokenizer("byte")
    texts = ["a red circle", "héllo wörld ✓", ""]
    ids = tok(texts)
    assert ids.shape == (3, 77) and ids.dtype == np.int32
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    assert ids.max() < tok.vocab_size == 259
    for text, row in zip(texts, ids):
        n = len(text.encode("utf-8"))
        assert row[0] == tok.bos_token_id and row[n + 1] == tok.eos_token_id
        assert np.all(row[n + 2 :] == tok.pad_token_id)
        assert tok.decode(row) == text


def test_byte_truncation_warns(caplog):
    tok = tokenizers.ByteTokenizer(context_length=16)
    with caplog.at_level(logging.WARNING, logger="ldm_jax"):
        ids = tok(["short", "x" * 40])
    assert ids.shape == (2, 16)
    assert ids[1, -1] == tok.eos_token_id and ids[1, 0] == tok.bos_token_id
    assert tok.decode(ids[1]) == "x" * 14
    messages = [r.getMessage() for r in caplog.records if r.name == "ldm_jax"]
    assert len(messages) == 1
    assert "truncated" in messages[0] and "42 tokens" in messages[0] and "16" in messages[0]


def test_rejects_a_bare_string():
    with pytest.raises(TypeError, match="single string"):
        tokenizers.ByteTokenizer()("a red circle")


def test_words_round_trip_unknown_words_and_truncation(caplog):
    from ldm_jax.data import shapes

    vocabulary = sorted(shapes.CAPTION_WORDS)
    tok = tokenizers.get_tokenizer("words", context_length=8, vocabulary=vocabulary)
    assert tok.vocab_size == len(vocabulary) + 4
    with caplog.at_level(logging.WARNING, logger="ldm_jax"):
        ids = tok(["A red, CIRCLE!", "", "a pink circle"])
    assert ids.shape == (3, 8) and ids.dtype == np.int32
    red = vocabulary.index("red") + tok.word_offset
    assert ids[0, :5].tolist() == [tok.bos_token_id, ids[0, 1], red, ids[0, 3], tok.eos_token_id]
    assert tok.decode(ids[0]) == "a red circle"
    assert ids[1, :2].tolist() == [tok.bos_token_id, tok.eos_token_id] and not ids[1, 2:].any()
    assert tok.decode(ids[2]) == "a <unk> circle"
    assert "not in the tokenizer's vocabulary: ['pink']" in caplog.text
    # Every shapes caption fits the demo config's 16-word context (bos and eos included).
    rng = np.random.default_rng(0)
    for _ in range(200):
        attrs = shapes.sample_attributes(rng)
        for caption in (shapes.random_caption(attrs, rng), shapes.canonical_caption(attrs)):
            assert len(tok.words(caption)) + 2 <= 16 and set(tok.words(caption)) <= set(vocabulary)
    with caplog.at_level(logging.WARNING, logger="ldm_jax"):
        long = tok(["a red circle at the top of a black background"])
    assert long[0, -1] == tok.eos_token_id and "truncated" in caplog.text


@pytest.mark.parametrize("vocabulary", [(), ("red", "red"), ("Red",), ("two words",)])
def test_words_refuses_a_bad_vocabulary(vocabulary):
    with pytest.raises(ValueError, match="distinct lower-case words"):
        tokenizers.get_tokenizer("words", vocabulary=vocabulary)


def test_clip_known_answer(clip_tokenizer_dir):
    tok = tokenizers.get_tokenizer("clip", clip_tokenizer_dir)
    ids = tok(["a cat sitting on a sunny windowsill"])
    expected = [49406, 320, 2368, 4919, 525, 320, 5438, 3110, 6300, 660, 49407]
    assert ids.shape == (1, 77) and ids.dtype == np.int32
    assert ids[0, :11].tolist() == expected
    assert np.all(ids[0, 11:] == 49407)  # This folder pads with <|endoftext|>.
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        49408,
        49406,
        49407,
        49407,
    )


def test_clip_truncation_warns(clip_tokenizer_dir, caplog):
    tok = tokenizers.get_tokenizer("clip", clip_tokenizer_dir)
    with caplog.at_level(logging.WARNING, logger="ldm_jax"):
        ids = tok(["a red circle " * 40])
    assert ids.shape == (1, 77) and ids[0, -1] == tok.eos_token_id
    assert ids[0, 1:4].tolist() == tok(["a red circle"])[0, 1:4].tolist()
    messages = [r.getMessage() for r in caplog.records if r.name == "ldm_jax"]
    assert len(messages) == 1 and "122 tokens" in messages[0] and "77" in messages[0]


def test_bad_names_and_paths(tmp_path):
    with pytest.raises(ValueError, match="byte, words, clip"):
        tokenizers.get_tokenizer("sentencepiece")
    with pytest.raises(ValueError, match="needs path"):
        tokenizers.get_tokenizer("clip")
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        tokenizers.get_tokenizer("clip", tmp_path / "missing")
