"""The language of a caption from its script, for samples whose ``KEY.json`` names none (img2dataset's).

:func:`guess_language` tells Chinese from the rest and nothing more: ``zh`` when CJK ideographs
carry the text, ``ja`` when it holds any kana, else ``en`` (also for empty text, digits and
punctuation only, Korean, Cyrillic, ...). It picks the object-tags prompt of a sample
(:data:`ernievil2.data.text_views.DEFAULT_OBJECTS_TEMPLATES` has ``en`` and ``zh``; ``ja`` falls
back to ``en`` there).

:func:`kept_captions` selects the captions of given languages (``data.caption_languages``, an
evaluation set's ``caption_languages``), by each caption's language (:func:`caption_languages`).
"""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

# CJK Unified Ideographs and their extensions, plus the compatibility ideographs.
_IDEOGRAPHS: tuple[tuple[int, int], ...] = (
    (0x3400, 0x4DBF),    # Extension A
    (0x4E00, 0x9FFF),    # CJK Unified Ideographs
    (0xF900, 0xFAFF),    # Compatibility Ideographs
    (0x20000, 0x2FA1F),  # Extensions B-F, Compatibility Supplement
    (0x30000, 0x323AF),  # Extensions G-H
)
_KANA: tuple[tuple[int, int], ...] = (
    (0x3040, 0x309F),  # Hiragana
    (0x30A0, 0x30FF),  # Katakana
    (0x31F0, 0x31FF),  # Katakana Phonetic Extensions
    (0xFF66, 0xFF9D),  # Halfwidth Katakana
)


def _in(ch: str, ranges: tuple[tuple[int, int], ...]) -> bool:
    code = ord(ch)
    return any(lo <= code <= hi for lo, hi in ranges)


def guess_language(text: str) -> str:
    """``zh``, ``ja`` or ``en`` for ``text`` by its script.

    Any kana → ``ja`` (Chinese is written without it). Else each CJK ideograph counts as one word,
    against the words (runs of letters) in other scripts: ``zh`` when the ideographs are at least as
    many (``"Nike 运动鞋 男款"``: 5 to 1), else ``en`` (``"a photo of 北京"``: 2 to 3). Digits,
    punctuation and spaces do not count; text without letters (``""``, ``"2024!"``) is ``en``.
    """
    ideographs = words = 0
    in_word = False
    for ch in text:
        if _in(ch, _KANA):
            return "ja"
        if _in(ch, _IDEOGRAPHS):
            ideographs += 1
            in_word = False
        elif ch.isalpha():
            words += not in_word
            in_word = True
        else:
            in_word = False
    return "zh" if ideographs and ideographs >= words else "en"


def normalise_language(code: str) -> str:
    """``code`` lower-cased with ``_`` as ``-`` (``zh_CN`` → ``zh-cn``)."""
    return str(code).strip().lower().replace("_", "-")


def language_in(code: str, wanted: Collection[str]) -> bool:
    """True when language ``code`` is one of ``wanted`` or has one of them as its base (``zh-cn``
    is in ``["zh"]``; ``zh`` is not in ``["zh-cn"]``)."""
    code = normalise_language(code)
    names = {normalise_language(w) for w in wanted}
    return code in names or code.split("-")[0] in names


def caption_languages(captions: Sequence[str], lang: str, meta: Mapping[str, Any] | None = None) -> list[str]:
    """The language of each caption of a sample: ``meta["languages"]`` when it names one per caption
    (a sample of mixed languages, ``lang = "mul"``: the demo's), else ``lang`` for every caption; a
    ``mul`` sample without that list (or with one of another length) has each caption's language
    guessed from its script (:func:`guess_language`)."""
    given = (meta or {}).get("languages")
    if isinstance(given, list) and len(given) == len(captions):
        return [str(x) for x in given]
    if normalise_language(lang) == "mul":
        return [guess_language(c) for c in captions]
    return [str(lang)] * len(captions)


def kept_captions(captions: Sequence[str], lang: str, meta: Mapping[str, Any] | None,
                  wanted: Collection[str]) -> list[int]:
    """Indices of the captions whose language (:func:`caption_languages`) is in ``wanted``
    (:func:`language_in`); every index when ``wanted`` is empty."""
    if not wanted:
        return list(range(len(captions)))
    return [i for i, code in enumerate(caption_languages(captions, lang, meta)) if language_in(code, wanted)]
