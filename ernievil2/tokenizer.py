"""BERT/ERNIE WordPiece tokenizer built on the ``tokenizers`` library.

Text is cleaned (control characters dropped, whitespace unified), every CJK character is split
apart, text is lower-cased and accents stripped, split on whitespace and punctuation, then each
word is cut greedily into the longest word pieces found in the vocab (continuations carry ``##``).
Sequences are ``[CLS] pieces [SEP]``, right-padded with ``[PAD]``.

Two vocab file formats are read:

* one token per line, the id being the line number (BERT / PaddleNLP, and what
  :meth:`WordPieceTokenizer.build_vocab` writes);
* ``token<TAB>id`` per line (the official ERNIE release, e.g. ``ernie-3.0-base-zh/vocab.txt``).

When a token appears twice the later line wins, as in the official ERNIE and PaddleNLP loaders
(the released vocab lists ``$`` at 12084 and 18005; 18005 is used).
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from ernievil2.atomic import atomic_write

__all__ = ["WordPieceTokenizer", "SPECIAL_TOKENS", "load_vocab"]

#: Special tokens in the order :meth:`WordPieceTokenizer.build_vocab` writes them (ids 0..4).
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]")
_CONTINUING_PREFIX = "##"
_MAX_CHARS_PER_WORD = 100


def load_vocab(vocab_file: str | os.PathLike) -> dict[str, int]:
    """Read a vocab file (plain or ``token<TAB>id``) into ``{token: id}``.

    Raises ``FileNotFoundError`` naming the path when the file does not exist.
    """
    path = Path(vocab_file)
    if not path.is_file():
        raise FileNotFoundError(f"vocab file not found: {path}")
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f):
            line = line.rstrip("\n").rstrip("\r")
            token, sep, idx = line.rpartition("\t")
            if sep and idx.isdigit():
                tok_id = int(idx)
            else:
                token, tok_id = line, lineno
            if token == "":
                continue
            vocab[token] = tok_id
    if not vocab:
        raise ValueError(f"vocab file {path} holds no tokens")
    return vocab


def _normalizer(lowercase: bool) -> normalizers.Normalizer:
    return normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lowercase, lowercase=lowercase
    )


class WordPieceTokenizer:
    """WordPiece tokenizer compatible with BERT/ERNIE's ``BasicTokenizer`` + ``WordpieceTokenizer``.

    ``max_length`` is the default total sequence length (``[CLS]`` and ``[SEP]`` included) used by
    :meth:`encode`, :meth:`pad` and :meth:`__call__`.
    """

    def __init__(self, vocab_file: str | os.PathLike, max_length: int = 48, lowercase: bool = True):
        self.vocab_file = Path(vocab_file)
        self.lowercase = bool(lowercase)
        self.max_length = self._check_length(max_length)
        self._vocab = load_vocab(self.vocab_file)
        for token in SPECIAL_TOKENS:
            if token not in self._vocab:
                raise ValueError(f"special token {token} missing from vocab file {self.vocab_file}")
        self._pad_id = self._vocab["[PAD]"]
        self._cls_id = self._vocab["[CLS]"]
        self._sep_id = self._vocab["[SEP]"]
        self._mask_id = self._vocab["[MASK]"]
        self._unk_id = self._vocab["[UNK]"]
        self._vocab_size = max(self._vocab.values()) + 1
        self._id_to_token: dict[int, str] = {i: t for t, i in self._vocab.items()}

        tok = Tokenizer(
            models.WordPiece(
                vocab=self._vocab,
                unk_token="[UNK]",
                max_input_chars_per_word=_MAX_CHARS_PER_WORD,
                continuing_subword_prefix=_CONTINUING_PREFIX,
            )
        )
        tok.normalizer = _normalizer(self.lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self._tok = tok

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """Size of the id space: largest id in the vocab + 1 (the embedding table's rows)."""
        return self._vocab_size

    @property
    def pad_id(self) -> int:
        """Id of ``[PAD]``."""
        return self._pad_id

    @property
    def cls_id(self) -> int:
        """Id of ``[CLS]``."""
        return self._cls_id

    @property
    def sep_id(self) -> int:
        """Id of ``[SEP]``."""
        return self._sep_id

    @property
    def mask_id(self) -> int:
        """Id of ``[MASK]``."""
        return self._mask_id

    @property
    def unk_id(self) -> int:
        """Id of ``[UNK]``."""
        return self._unk_id

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of all five special tokens."""
        return frozenset(self._vocab[t] for t in SPECIAL_TOKENS)

    # ------------------------------------------------------------------ lookups
    def token_to_id(self, token: str) -> int | None:
        """Id of ``token``, or ``None`` when it is not in the vocab."""
        return self._vocab.get(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token of ``token_id``, or ``None`` when no token has that id."""
        return self._id_to_token.get(int(token_id))

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        """Tokens for ``ids`` (unknown ids give ``[UNK]``)."""
        return [self._id_to_token.get(int(i), "[UNK]") for i in ids]

    # ------------------------------------------------------------------ encoding
    @staticmethod
    def _check_length(max_length: int) -> int:
        max_length = int(max_length)
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 to hold [CLS] and [SEP], got {max_length}")
        return max_length

    def _resolve_length(self, max_length: int | None) -> int:
        return self.max_length if max_length is None else self._check_length(max_length)

    def tokenize(self, text: str) -> list[str]:
        """Word pieces of ``text`` (no special tokens, no truncation)."""
        return self._tok.encode(text, add_special_tokens=False).tokens

    def _wrap(self, piece_ids: Sequence[int], max_length: int) -> list[int]:
        return [self._cls_id, *piece_ids[: max_length - 2], self._sep_id]

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """``[CLS] pieces [SEP]`` ids, pieces truncated so the total is ``<= max_length``; unpadded."""
        length = self._resolve_length(max_length)
        return self._wrap(self._tok.encode(text, add_special_tokens=False).ids, length)

    def encode_batch(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """:meth:`encode` for many texts at once (uses the library's batch encoder)."""
        length = self._resolve_length(max_length)
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, length) for e in encs]

    def pad(self, id_lists: Sequence[Sequence[int]], max_length: int | None = None) -> np.ndarray:
        """Right-pad id lists with ``pad_id`` into an int64 ``[N, max_length]`` array.

        Lists longer than ``max_length`` are cut, keeping their last id (``[SEP]``) at the end.
        """
        length = self._resolve_length(max_length)
        out = np.full((len(id_lists), length), self._pad_id, dtype=np.int64)
        for row, ids in enumerate(id_lists):
            ids = list(ids)
            if len(ids) > length:
                ids = ids[: length - 1] + ids[-1:]
            out[row, : len(ids)] = ids
        return out

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
        """Encode and pad: int64 ``[N, L]`` with ``L = max_length`` (default ``self.max_length``).

        A single string gives ``N = 1``.
        """
        if isinstance(texts, str):
            texts = [texts]
        length = self._resolve_length(max_length)
        if len(texts) == 1:
            return self.pad([self.encode(texts[0], length)], length)
        return self.pad(self.encode_batch(texts, length), length)

    # ------------------------------------------------------------------ training
    @staticmethod
    def build_vocab(
        texts: Iterable[str],
        out_file: str | os.PathLike,
        vocab_size: int = 8000,
        min_frequency: int = 1,
        lowercase: bool = True,
    ) -> Path:
        """Build a WordPiece vocab from captions, deterministically (same texts → same file).

        The text is normalised and split exactly as at tokenization time (``tokenizers``'
        BERT normaliser and pre-tokenizer). The vocab holds the special tokens first (``[PAD]``=0,
        ``[CLS]``=1, ``[SEP]``=2, ``[MASK]``=3, ``[UNK]``=4), then every character seen (as a word
        start and as a ``##`` continuation, so any seen word can be spelled), then whole words by
        falling frequency (ties alphabetical) up to ``vocab_size``. (``tokenizers``' own
        ``WordPieceTrainer`` breaks ties between merges in hash order, which changes the vocab,
        and so a run's results, from one process to the next.) ``out_file`` (``vocab.txt``, one
        token per line, id = line number) is written atomically. Returns its path.
        """
        out_path = Path(out_file)
        normalizer = _normalizer(lowercase)
        pre = pre_tokenizers.BertPreTokenizer()
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(word for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
        counts = Counter({w: c for w, c in counts.items() if len(w) <= _MAX_CHARS_PER_WORD})
        initials = sorted({w[0] for w in counts})
        continuing = sorted({_CONTINUING_PREFIX + ch for w in counts for ch in w[1:]})
        specials = list(SPECIAL_TOKENS)
        budget = int(vocab_size) - len(specials) - len(initials) - len(continuing)
        if budget < 0:
            raise ValueError(
                f"vocab_size {vocab_size} is too small: the captions need {len(specials) + len(initials) + len(continuing)} "
                "special and character tokens"
            )
        words = sorted((w for w, c in counts.items() if len(w) > 1 and c >= min_frequency), key=lambda w: (-counts[w], w))
        ordered = specials + [t for t in initials if t not in specials] + continuing + words[:budget]
        bad = [t for t in ordered if "\n" in t or "\r" in t or t == ""]
        if bad:
            raise ValueError(f"trained vocab holds tokens that cannot be written one per line: {bad!r}")

        with atomic_write(out_path) as f:
            f.write("\n".join(ordered) + "\n")
        return out_path
