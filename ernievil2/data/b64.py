"""Base64 image columns as the upstream release's files, Chinese-CLIP's imgs.tsv and others write them."""
from __future__ import annotations

import base64
import binascii


def decode_base64(data: str) -> bytes:
    """Standard or URL-safe base64 (whitespace ignored, missing ``=`` padding tolerated);
    ``ValueError`` saying why otherwise."""
    s = "".join(data.split())
    if not s:
        raise ValueError("empty image column")
    s += "=" * (-len(s) % 4)
    altchars = b"-_" if ("-" in s or "_" in s) else None
    try:
        return base64.b64decode(s, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not base64 ({exc})") from None
