"""Reading JSON Lines files with line numbers, so every error can name ``file:line``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Union


def jsonl_objects(path: Union[str, Path]) -> Iterator[tuple[int, Union[dict, str]]]:
    """``(line number, object)`` for each non-blank line of ``path``; where a line is not a JSON
    object, ``(line number, why)`` with the reason as a string (callers raise or count it)."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exn:
                yield lineno, f"invalid JSON ({exn})"
                continue
            yield lineno, obj if isinstance(obj, dict) else f"a {type(obj).__name__}, not an object"
