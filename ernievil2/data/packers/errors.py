"""The packer's error: input or options that cannot be packed at all."""
from __future__ import annotations

from ernievil2.data.formats import FormatError


class PackError(FormatError):
    """Input that cannot be packed at all (missing file, wrong structure, bad options); the message
    names the file (and line or key). ``launch/pack.py`` exits with status 2 on it."""


def as_pack_error(exn: FormatError) -> PackError:
    """``exn`` itself when it is a :class:`PackError`, else a :class:`PackError` with its message."""
    return exn if isinstance(exn, PackError) else PackError(str(exn))
