"""The language of a caption from its script, for samples whose ``KEY.json`` names none (img2dataset's).

:func:`guess_language` tells Chinese from the rest and nothing more: ``zh`` when CJK ideographs
carry the text, ``ja`` when it holds any kana, else ``en`` (also for empty text, digits and
punctuation only, Korean, Cyrillic, ...). It picks the object-tags prompt of a sample
(:data:`ernievil2.data.text_views.DEFAULT_OBJECTS_TEMPLATES` has ``en`` and ``zh``; ``ja`` falls
back to ``en`` there).
"""
from __future__ import annotations

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
