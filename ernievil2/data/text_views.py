"""Text operations of the training views: the object-tags text of a sample, the keys that name
its tags (so the loss can tell which objects texts are true of which images) and the token-level
augmentation of a caption."""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

DEFAULT_OBJECTS_TEMPLATES: dict[str, str] = {"en": "the picture contains {objects}", "zh": "图中有{objects}"}
DEFAULT_OBJECTS_JOINERS: dict[str, str] = {"en": ", ", "zh": "、"}
#: Tag keys a sample carries (``objects_tags`` / ``objects_text_tags``, 0-padded).
MAX_TAGS = 16


def _resolve_lang(table: Mapping[str, str], lang: str, what: str) -> str:
    if lang in table:
        return table[lang]
    base = lang.replace("_", "-").split("-")[0].lower()
    if base in table:
        return table[base]
    if "en" in table:
        return table["en"]
    raise ValueError(f"no objects {what} for language {lang!r} (have {sorted(table)})")


def unique_tags(objects: Sequence[str] | None) -> list[str]:
    """Tags stripped, empty ones dropped, duplicates removed keeping first occurrences."""
    seen: dict[str, None] = {}
    for obj in objects or ():
        obj = str(obj).strip()
        if obj and obj not in seen:
            seen[obj] = None
    return list(seen)


def tag_key(tag: str) -> int:
    """A positive int64 naming one (stripped) tag: equal tags, equal keys (collisions 2^-63)."""
    digest = hashlib.blake2b(tag.strip().encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFFFFFFFFFF or 1


def tag_keys(tags: Sequence[str]) -> np.ndarray:
    out = np.zeros(MAX_TAGS, dtype=np.int64)
    keys = [tag_key(t) for t in tags[:MAX_TAGS]]
    out[: len(keys)] = keys
    return out


def objects_text(
    objects: Sequence[str] | None,
    lang: str,
    templates: Mapping[str, str] = DEFAULT_OBJECTS_TEMPLATES,
    joiners: Mapping[str, str] = DEFAULT_OBJECTS_JOINERS,
) -> str | None:
    """The object-tags text of a sample, or ``None`` when it has no tags.

    Tags are stripped, empty ones dropped and duplicates removed keeping first occurrences; they
    are joined with the language's joiner and put into the language's template at ``{objects}``.
    The language is looked up as given, then by its base (``zh-CN`` → ``zh``), then ``en``.
    """
    seen = unique_tags(objects)
    if not seen:
        return None
    template = _resolve_lang(templates, lang, "template")
    joiner = _resolve_lang(joiners, lang, "joiner") if joiners else ", "
    return template.replace("{objects}", joiner.join(seen))


def augment_text_ids(
    ids: Sequence[int],
    rng: np.random.Generator,
    mask_id: int,
    mask_prob: float = 0.15,
    delete_prob: float = 0.1,
    swap_prob: float = 0.1,
) -> list[int]:
    """Token-level text view of ``[CLS] pieces [SEP]`` ids (unpadded); the ends are kept.

    Each word piece is independently deleted with ``delete_prob`` (at least one piece always
    survives); then, left to right, a piece is swapped with its right neighbour with
    ``swap_prob`` (a swapped pair is not swapped again); then each piece is replaced by
    ``mask_id`` with ``mask_prob``. Returns the new unpadded id list (never longer).
    """
    if len(ids) <= 2:
        return list(ids)
    pieces = np.asarray(ids[1:-1], dtype=np.int64)
    n = len(pieces)
    keep = rng.random(n) >= delete_prob
    if not keep.any():
        keep[int(rng.integers(n))] = True
    pieces = pieces[keep]
    m = len(pieces)
    if swap_prob > 0 and m > 1:
        swaps = rng.random(m - 1) < swap_prob
        i = 0
        while i < m - 1:
            if swaps[i]:
                pieces[i], pieces[i + 1] = pieces[i + 1], pieces[i]
                i += 2
            else:
                i += 1
    if mask_prob > 0:
        pieces[rng.random(m) < mask_prob] = mask_id
    return [int(ids[0]), *pieces.tolist(), int(ids[-1])]
