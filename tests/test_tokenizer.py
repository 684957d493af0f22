"""WordPiece tokenizer: parity with reference BERT/ERNIE tokenization, specials, training, errors."""
from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from ernievil2.tokenizer import SPECIAL_TOKENS, WordPieceTokenizer

NEEDS_PADDLENLP = "needs paddlenlp (the paddlenlp extra: pip install -e '.[paddlenlp]')"


# --------------------------------------------------------------------------- reference
class RefBertTokenizer:
    """Small independent pure-Python BERT BasicTokenizer + WordpieceTokenizer (lower-casing)."""

    def __init__(self, vocab_path: Path):
        self.vocab: dict[str, int] = {}
        with open(vocab_path, encoding="utf-8") as f:
            for num, line in enumerate(f):
                line = line.rstrip("\n")
                parts = line.split("\t")
                if len(parts) == 2:
                    self.vocab[parts[0]] = int(parts[1])
                elif line:
                    self.vocab[line] = num

    @staticmethod
    def _is_whitespace(ch: str) -> bool:
        return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"

    @staticmethod
    def _is_control(ch: str) -> bool:
        if ch in "\t\n\r":
            return False
        return unicodedata.category(ch).startswith("C")

    @staticmethod
    def _is_punct(ch: str) -> bool:
        cp = ord(ch)
        if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
            return True
        return unicodedata.category(ch).startswith("P")

    @staticmethod
    def _is_cjk(cp: int) -> bool:
        ranges = [
            (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
            (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
        ]
        return any(lo <= cp <= hi for lo, hi in ranges)

    def basic(self, text: str) -> list[str]:
        cleaned = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or self._is_control(ch):
                continue
            cleaned.append(" " if self._is_whitespace(ch) else ch)
        spaced = []
        for ch in cleaned:
            spaced.append(f" {ch} " if self._is_cjk(ord(ch)) else ch)
        words = "".join(spaced).split()
        out: list[str] = []
        for word in words:
            word = word.lower()
            word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")
            cur = ""
            for ch in word:
                if self._is_punct(ch):
                    if cur:
                        out.append(cur)
                    out.append(ch)
                    cur = ""
                else:
                    cur += ch
            if cur:
                out.append(cur)
        return out

    def wordpiece(self, word: str) -> list[str]:
        if len(word) > 100:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            end, found = len(word), None
            while start < end:
                sub = word[start:end]
                if start > 0:
                    sub = "##" + sub
                if sub in self.vocab:
                    found = sub
                    break
                end -= 1
            if found is None:
                return ["[UNK]"]
            pieces.append(found)
            start = end
        return pieces

    def encode(self, text: str) -> list[int]:
        toks = [p for w in self.basic(text) for p in self.wordpiece(w)]
        return [self.vocab["[CLS]"], *(self.vocab[t] for t in toks), self.vocab["[SEP]"]]


EDGE_CASES = [
    "Café NAÏVE résumé Über",
    "a\tb\nc\r\x00d\ufffde\u200bf",  # whitespace kinds, NUL, replacement char, zero-width (Cf)
    "hello,world!!(test)[x]{y}<z>",
    "x" * 101 + " ok",  # over max_input_chars_per_word -> [UNK]
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３，。！",
    "emoji 🙂 and ☃ and ℝ",
    "mixed中文English混合123abc",
    "   ",
    "",
    "zzqqxxj qwxzv",
    "the dog's ball -- 3.5 m/s @home #tag",
    "日本語のテキスト、한국어 텍스트",
]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tok(released_vocab: Path) -> WordPieceTokenizer:
    return WordPieceTokenizer(released_vocab)


@pytest.fixture(scope="module")
def all_captions(flickr8k_dir: Path, coco_mini_dir: Path, seed_sample: Path) -> list[str]:
    texts: list[str] = []
    with open(flickr8k_dir / "captions.jsonl", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            texts += rec["captions_en"] + rec["captions_zh"]
    with open(coco_mini_dir / "captions.jsonl", encoding="utf-8") as f:
        for line in f:
            texts += json.loads(line)["captions_en"]
    with open(seed_sample, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                texts.append(line.split("\t", 1)[0])
    assert len(texts) > 7000
    return texts


# --------------------------------------------------------------------------- parity
def test_parity_with_python_reference(tok, released_vocab, all_captions):
    ref = RefBertTokenizer(released_vocab)
    ours = tok.encode_batch(all_captions, max_length=512)
    mismatches = [(t, r, o) for t, o in zip(all_captions, ours) if (r := ref.encode(t)) != o]
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:3]}"
    # single-text path agrees with the batch path
    for text, ids in list(zip(all_captions, ours))[::500]:
        assert tok.encode(text, max_length=512) == ids


def test_edge_cases_match_python_reference(tok, released_vocab):
    ref = RefBertTokenizer(released_vocab)
    for text in EDGE_CASES:
        assert tok.encode(text, max_length=512) == ref.encode(text), repr(text)
    assert tok.tokenize("Café NAÏVE") == ["cafe", "nai", "##ve"]
    assert tok.tokenize("x" * 101) == ["[UNK]"]
    assert tok.tokenize("穿着裙子") == ["穿", "着", "裙", "子"]
    assert tok.tokenize("") == []


@pytest.mark.slow
def test_parity_with_paddlenlp(tok, released_vocab, all_captions, tmp_path):
    pytest.importorskip("paddlenlp", reason=NEEDS_PADDLENLP)
    from paddlenlp.transformers import ErnieTokenizer

    # PaddleNLP reads one token per line; the release is ``token<TAB>id``.
    plain = tmp_path / "vocab.txt"
    with open(released_vocab, encoding="utf-8") as f:
        plain.write_text("".join(line.rstrip("\n").rsplit("\t", 1)[0] + "\n" for line in f), encoding="utf-8")
    ref = ErnieTokenizer(vocab_file=str(plain))
    texts = all_captions + EDGE_CASES
    ours = tok.encode_batch(texts, max_length=512)
    mismatches = [(t, o) for t, o in zip(texts, ours) if ref(t)["input_ids"] != o]
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:3]}"
    long_text = " ".join(all_captions[:10])
    assert ref(long_text, max_length=48, truncation=True)["input_ids"] == tok.encode(long_text)


def test_plain_and_tab_vocab_formats_agree(tok, released_vocab, tmp_path):
    plain = tmp_path / "vocab.txt"
    with open(released_vocab, encoding="utf-8") as f:
        plain.write_text("".join(line.rstrip("\n").rsplit("\t", 1)[0] + "\n" for line in f), encoding="utf-8")
    tok2 = WordPieceTokenizer(plain)
    texts = ["A little girl climbing into a wooden playhouse .", "穿着连衣裙的小女孩。", "price $5"]
    np.testing.assert_array_equal(tok(texts), tok2(texts))
    assert tok2.unk_id == tok.unk_id == 39979
    # the release lists "$" twice (ids 12084, 18005): the later one wins, as in ERNIE/PaddleNLP
    assert tok.token_to_id("$") == 18005


# --------------------------------------------------------------------------- specials / shapes
def test_special_ids_and_truncation(tok):
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.unk_id) == (0, 1, 2, 3, 39979)
    assert tok.vocab_size == 39980
    ids = tok.encode("a dog")
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) == 4
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "a", "dog", "[SEP]"]

    long_text = "dog " * 100
    ids = tok.encode(long_text)
    assert len(ids) == 48 and ids[0] == tok.cls_id and ids[-1] == tok.sep_id
    assert ids[1:-1] == [tok.token_to_id("dog")] * 46
    assert len(tok.encode(long_text, max_length=5)) == 5 and tok.encode(long_text, max_length=5)[-1] == 2
    assert tok.encode("", max_length=5) == [1, 2]
    with pytest.raises(ValueError):
        tok.encode("a", max_length=1)


def test_call_and_pad(tmp_path):
    """Needs no released vocab: a stand-in with the special tokens first, as both vocabs have them."""
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join([*SPECIAL_TOKENS, "a", "cat", "dog"]) + "\n", encoding="utf-8")
    tok = WordPieceTokenizer(vocab)
    assert (tok.pad_id, tok.cls_id, tok.sep_id) == (0, 1, 2)
    arr = tok(["a dog", "dog " * 100, ""], max_length=8)
    assert arr.dtype == np.int64 and arr.shape == (3, 8)
    dog = tok.token_to_id("dog")
    np.testing.assert_array_equal(arr[0], [1, tok.token_to_id("a"), dog, 2, 0, 0, 0, 0])
    np.testing.assert_array_equal(arr[1], [1] + [dog] * 6 + [2])
    np.testing.assert_array_equal(arr[2], [1, 2, 0, 0, 0, 0, 0, 0])
    single = tok("a dog")
    assert single.shape == (1, 48) and single[0, 3] == 2 and (single[0, 4:] == 0).all()
    # pad cuts an over-long list but keeps its final [SEP]
    padded = tok.pad([[1, 5, 6, 7, 8, 2]], max_length=4)
    np.testing.assert_array_equal(padded, [[1, 5, 6, 2]])


# --------------------------------------------------------------------------- training
def test_build_vocab_round_trip(tmp_path):
    captions = [
        "A child in a pink dress is climbing up a set of stairs in an entry way .",
        "A black dog and a spotted dog are fighting",
        "Two dogs on pavement moving toward each other .",
        "Café with naïve décor",
        "穿着连衣裙的小女孩。",
        "两只狗在路上打架。",
        "马路上打架的狗。",
    ]
    out = WordPieceTokenizer.build_vocab(captions, tmp_path / "sub" / "vocab.txt", vocab_size=200)
    assert out == tmp_path / "sub" / "vocab.txt" and out.exists()
    assert [p.name for p in out.parent.iterdir()] == ["vocab.txt"]  # no temp file left behind
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[:5] == list(SPECIAL_TOKENS)
    assert len(lines) == len(set(lines)) <= 200

    tok = WordPieceTokenizer(out, max_length=64)
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.unk_id) == (0, 1, 2, 3, 4)
    assert tok.vocab_size == len(lines)
    vocab = set(lines)
    for cap in captions:
        pieces = tok.tokenize(cap)
        assert pieces and "[UNK]" not in pieces
        assert all(p in vocab for p in pieces)
        ids = tok.encode(cap)
        assert tok.unk_id not in ids and tok.convert_ids_to_tokens(ids[1:-1]) == pieces
    assert tok.tokenize("café") == tok.tokenize("CAFE")  # lower-cased, accents stripped
    assert tok.tokenize("狗打架") == ["狗", "打", "架"]
    assert tok.tokenize("qqq") == ["[UNK]"]  # q never seen


# --------------------------------------------------------------------------- errors
def test_missing_vocab_file(tmp_path):
    missing = tmp_path / "nope" / "vocab.txt"
    with pytest.raises(FileNotFoundError, match="nope"):
        WordPieceTokenizer(missing)


def test_missing_special_token(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[CLS]\n[SEP]\n[UNK]\na\nb\n", encoding="utf-8")
    with pytest.raises(ValueError) as err:
        WordPieceTokenizer(vocab)
    assert "[MASK]" in str(err.value) and str(vocab) in str(err.value)


def test_build_vocab_is_identical_across_processes(tmp_path):
    """A built vocab must not depend on hash seeds: runs with the same data must be reproducible."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from ernievil2.tokenizer import WordPieceTokenizer\n"
        "texts = ['a large red circle to the left of a small blue square', '一个大的红色圆形',\n"
        "         'the picture contains red circle, blue square', 'circles and squares', 'squared circle']\n"
        "WordPieceTokenizer.build_vocab(texts * 3, sys.argv[1], vocab_size=60)\n"
    )
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / f"vocab{seed}.txt"
        subprocess.run([sys.executable, "-c", script, str(out)], check=True,
                       env={**__import__("os").environ, "PYTHONHASHSEED": seed})
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    tok = WordPieceTokenizer(tmp_path / "vocab1.txt")
    assert tok.vocab_size <= 60
    # Every seen word can be spelled: no [UNK] for any training text.
    assert tok.unk_id not in tok.encode("squared circles 红色")
