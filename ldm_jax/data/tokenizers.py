"""Text tokenizers with one small interface: `tok(texts) -> int32[batch, context_length]`.

Each has `vocab_size`, `context_length`, `pad_token_id`, `bos_token_id`, `eos_token_id`. A
sequence is `[bos] + tokens + [eos]`, then `pad` up to `context_length`; a prompt longer than the
context keeps its first tokens and ends with `eos` (as CLIP does), and a warning on the `ldm_jax`
logger says so.

- `ByteTokenizer`: UTF-8 bytes; needs no files (tests, and any text).
- `WordTokenizer`: whole words of a fixed vocabulary held in the config; needs no files (the
  embedded `shapes` dataset, whose captions use 31 words).
- `CLIPTokenizer`: OpenAI CLIP's BPE, through `transformers` (imported only when one is built),
  from a local folder such as a diffusers checkpoint's `tokenizer/`.
"""

import logging
import os
import re
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger("ldm_jax")

CONTEXT_LENGTH = 77  # CLIP's text context, used by every Stable Diffusion text encoder


def _pack(
    sequences: Sequence[Sequence[int]], context_length: int, eos_token_id: int, pad_token_id: int
) -> np.ndarray:
    """[bos, ..., eos] id lists -> int32[batch, context_length], truncated (eos last) and padded."""
    out = np.full((len(sequences), context_length), pad_token_id, dtype=np.int32)
    for row, ids in enumerate(sequences):
        if len(ids) > context_length:
            logger.warning(
                "Prompt %d was truncated: it has %d tokens (with bos/eos), the limit is %d.",
                row,
                len(ids),
                context_length,
            )
            ids = list(ids[: context_length - 1]) + [eos_token_id]
        out[row, : len(ids)] = ids
    return out


def _check_texts(texts: Sequence[str]) -> list[str]:
    # A bare string is a Sequence[str] too; tokenizing it character by character would be a
    # silent bug.
    if isinstance(texts, str):
        raise TypeError(
            "texts must be a sequence of strings, not a single string; wrap it in a list"
        )
    texts = list(texts)
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must be strings, got {type(text).__name__}: {text!r}")
    return texts


class ByteTokenizer:
    """UTF-8 bytes shifted by 3: pad 0, bos 1, eos 2, byte b -> b + 3; vocab_size 259."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    byte_offset = 3
    vocab_size = 256 + byte_offset

    def __init__(self, context_length: int = CONTEXT_LENGTH):
        if context_length < 2:
            raise ValueError(
                f"context_length must be at least 2 (bos and eos), got {context_length}"
            )
        self.context_length = context_length

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """texts -> int32[len(texts), context_length]."""
        sequences = [
            [self.bos_token_id]
            + [b + self.byte_offset for b in text.encode("utf-8")]
            + [self.eos_token_id]
            for text in _check_texts(texts)
        ]
        return _pack(sequences, self.context_length, self.eos_token_id, self.pad_token_id)

    def decode(self, ids: Sequence[int]) -> str:
        """One row of ids -> text, dropping pad/bos/eos: the inverse of `__call__`."""
        data = bytes(int(i) - self.byte_offset for i in ids if int(i) >= self.byte_offset)
        return data.decode("utf-8", errors="replace")


class WordTokenizer:
    """Lower-cased words (runs of letters and digits; punctuation is dropped) of a fixed
    vocabulary: pad 0, bos 1, eos 2, unknown 3, then the vocabulary in its order.

    For a closed-vocabulary dataset such as `shapes`: each word is one token from the first step,
    so the text encoder does not have to learn to spell it from bytes first, and the context is
    a few words long instead of a sentence's bytes (in the same 6.5 minutes of training the
    shapes model followed 65% of prompts' color and shape with words, 42% with bytes:
    experiments/demo_config/README.md).
    A word outside the vocabulary becomes `unknown`, with a warning that names it.
    """

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    unknown_token_id = 3
    word_offset = 4

    def __init__(self, vocabulary: Sequence[str], context_length: int = CONTEXT_LENGTH):
        if context_length < 2:
            raise ValueError(
                f"context_length must be at least 2 (bos and eos), got {context_length}"
            )
        words = [str(w) for w in vocabulary]
        bad = [w for w in words if self.words(w) != [w]]
        if not words or bad or len(set(words)) != len(words):
            raise ValueError(
                "the word tokenizer needs a non-empty vocabulary of distinct lower-case words "
                f"(letters and digits only); got {len(words)} words"
                + (f", not words: {bad[:5]}" if bad else "")
            )
        self.vocabulary = tuple(words)
        self._ids = {w: i + self.word_offset for i, w in enumerate(words)}
        self.vocab_size = len(words) + self.word_offset
        self.context_length = context_length

    @staticmethod
    def words(text: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", text.lower())

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """texts -> int32[len(texts), context_length]."""
        sequences, unknown = [], set()
        for text in _check_texts(texts):
            words = self.words(text)
            unknown.update(w for w in words if w not in self._ids)
            ids = [self._ids.get(w, self.unknown_token_id) for w in words]
            sequences.append([self.bos_token_id, *ids, self.eos_token_id])
        if unknown:
            logger.warning("Words not in the tokenizer's vocabulary: %s", sorted(unknown))
        return _pack(sequences, self.context_length, self.eos_token_id, self.pad_token_id)

    def decode(self, ids: Sequence[int]) -> str:
        """One row of ids -> its words (unknown ones as <unk>), dropping pad/bos/eos."""
        names = {self.unknown_token_id: "<unk>"} | {i: w for w, i in self._ids.items()}
        return " ".join(names[int(i)] for i in ids if int(i) in names)


class CLIPTokenizer:
    """CLIP BPE from a local folder with `vocab.json`, `merges.txt` and the tokenizer config."""

    def __init__(self, path: str | os.PathLike, context_length: int = CONTEXT_LENGTH):
        # Imported here: it costs seconds, and most users of ldm_jax never build this tokenizer.
        import transformers

        # vocab.json + merges.txt (released checkpoints), or only tokenizer.json (what
        # transformers 5's save_pretrained writes).
        files = ("vocab.json", "tokenizer.json")
        if not os.path.isdir(path) or not any(os.path.exists(os.path.join(path, f)) for f in files):
            raise FileNotFoundError(
                f"CLIP tokenizer folder {path!r} not found or has no vocab.json (expected "
                "vocab.json, merges.txt and tokenizer_config.json, or tokenizer.json, e.g. a "
                "diffusers checkpoint's tokenizer/)"
            )
        # from_pretrained, not CLIPTokenizer(vocab_file=..., merges_file=...): in transformers 5 the
        # constructor silently yields a tokenizer that maps every word to one id.
        self._tokenizer = transformers.CLIPTokenizer.from_pretrained(os.fspath(path))
        self.context_length = context_length
        self.vocab_size = len(self._tokenizer)
        self.bos_token_id = self._tokenizer.bos_token_id
        self.eos_token_id = self._tokenizer.eos_token_id
        # The folder's own pad token: <|endoftext|> for SD 1.x (CLIP), "!" (id 0) for SD 2.x
        # (OpenCLIP).
        self.pad_token_id = self._tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_id

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """texts -> int32[len(texts), context_length]."""
        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, self.context_length), np.int32)
        # Untruncated here so that `_pack` knows the real length for its warning; verbose=False
        # silences transformers' own "sequence length is longer" message (ours replaces it).
        sequences = self._tokenizer(texts, truncation=False, verbose=False)["input_ids"]
        return _pack(sequences, self.context_length, self.eos_token_id, self.pad_token_id)


TOKENIZERS = ("byte", "words", "clip")


def get_tokenizer(
    name: str,
    path: str | os.PathLike | None = None,
    context_length: int = CONTEXT_LENGTH,
    vocabulary: Sequence[str] = (),
) -> ByteTokenizer | WordTokenizer | CLIPTokenizer:
    """`"byte"`, `"words"` (needs `vocabulary`) or `"clip"` (needs `path`, a folder with the
    tokenizer files)."""
    if name == "byte":
        return ByteTokenizer(context_length)
    if name == "words":
        return WordTokenizer(vocabulary, context_length)
    if name == "clip":
        if path is None:
            raise ValueError(
                "the 'clip' tokenizer needs path=<folder with vocab.json and merges.txt> "
                "(e.g. a diffusers checkpoint's tokenizer/ folder)"
            )
        return CLIPTokenizer(path, context_length)
    raise ValueError(f"unknown tokenizer {name!r}; valid names: {', '.join(TOKENIZERS)}")


def tokenizer_from_config(config) -> ByteTokenizer | WordTokenizer | CLIPTokenizer:
    """The tokenizer a config's `tokenizer` field describes: name, path, context_length and,
    for "words", vocabulary."""
    return get_tokenizer(
        config.name,
        config.path or None,
        config.context_length,
        tuple(config.get("vocabulary", None) or ()),
    )


def token_ids(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """int32[N, context] from either kind of tokenizer a model may hold: one of this module's
    (`tok(texts)`) or a transformers CLIPTokenizer of a checkpoint, padded to its
    `model_max_length` and truncated with a warning, as diffusers' `encode_prompt` and training
    scripts' `tokenize_captions` (each tokenizer's own pad token: "<|endoftext|>", or "!" for
    OpenCLIP)."""
    if isinstance(texts, str):
        _check_texts(texts)  # the error for a bare string
    texts = [str(t) for t in texts]
    if not hasattr(tokenizer, "model_max_length"):
        return np.asarray(tokenizer(texts), np.int32)
    limit = tokenizer.model_max_length
    for text, full in zip(texts, tokenizer(texts).input_ids):
        if len(full) > limit:
            logger.warning("prompt truncated to %d tokens: %r", limit, text)
    ids = tokenizer(
        texts, padding="max_length", max_length=limit, truncation=True, return_tensors="np"
    ).input_ids
    return np.asarray(ids, np.int32)
