"""Read ``.pdparams`` state dicts without running code from the file.

A ``.pdparams`` file is a Python pickle; ``pickle.load`` (and ``paddle.load``, which calls it) will
call any importable function the file names, so a crafted file runs arbitrary code the moment it
is opened. :func:`load_pdparams` unpickles with a restricted :class:`pickle.Unpickler` whose
``find_class`` hands out only what a dict of NumPy arrays needs and refuses everything else with
:class:`UnsafeCheckpointError` before anything is called.

What Paddle 3.x ``paddle.save(state_dict, path)`` writes (checked on Paddle 3.3.1): a plain
``dict`` of NumPy arrays (tensors are converted with ``np.array``; bfloat16 tensors become
``uint16`` arrays), pickle protocol 4 by default, referencing only
``numpy(._core|.core).multiarray._reconstruct``, ``numpy.ndarray`` and ``numpy.dtype``; plus a
``"StructuredToParameterName@@"`` entry mapping each key to Paddle's internal parameter name (a
dict of strings). With protocol 2 or 3, arrays over 2**30 bytes are split into
``"<key>@@.<i>"`` slices described by an ``"UnpackBigParamInfor@@"`` entry, and protocol 2 stores
bytes through ``_codecs.encode`` (and names Python 2 modules, read as their Python 3 names). A
plain ``pickle.dump`` at protocol 5 (Python 3.14's default) stores arrays through NumPy's
``_frombuffer``. The official ERNIE-ViL 2.0 code reads its release with ``paddle.load``, so it
is this same format (a dict of NumPy arrays). All of these are read; the two bookkeeping entries are removed and split arrays
are joined back, as ``paddle.load`` does.
"""
from __future__ import annotations

import _codecs
import _compat_pickle
import collections
import os
import pickle
from typing import Any

import numpy as np

try:  # NumPy 2 moved the implementation modules; pickles written by NumPy 1 still name the old path.
    from numpy._core import multiarray as _multiarray
    from numpy._core.numeric import _frombuffer
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core.numeric import _frombuffer  # type: ignore[no-redef]

NAME_TABLE_KEY = "StructuredToParameterName@@"
UNPACK_INFO_KEY = "UnpackBigParamInfor@@"  # sic: Paddle's spelling

# (module, name) -> object. Everything a pickled dict of NumPy arrays references, and nothing else.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
    # Pickle protocol 5 (Python 3.14's default) stores arrays as _frombuffer(buffer, dtype, shape, order).
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): collections.OrderedDict,
    # Protocol 2 pickles bytes (the array buffers) as _codecs.encode(str, "latin1").
    ("_codecs", "encode"): _codecs.encode,
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint pickle references something other than NumPy arrays and plain containers."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        # encoding="latin1": arrays pickled by Python 2 carry their buffers as str (as paddle.load).
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 0-2 pickles name Python 2 modules (``__builtin__``, ``commands``): read them as the
        # Python 3 names pickle itself would import, so the check and the message see the real target.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._path}: refusing to load {module}.{name}: a .pdparams checkpoint should hold "
                "only NumPy arrays and plain containers, and unpickling this would import and possibly "
                "call it (arbitrary code execution). Nothing from the file was run. Only open "
                "checkpoints from sources you trust with paddle.load / pickle."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"{self._path}: refusing to load a persistent id ({pid!r})")


def restricted_load(path: str | os.PathLike) -> Any:
    """Unpickle ``path`` with only NumPy arrays, dtypes and plain containers allowed (raw object)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, path).load()
        except UnsafeCheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
            raise ValueError(f"{path}: not a readable .pdparams pickle ({type(e).__name__}: {e})") from e


def _join_split_arrays(obj: dict, path: str) -> dict:
    info = obj.pop(UNPACK_INFO_KEY, None)
    if info is None:
        return obj
    if not isinstance(info, dict):
        raise ValueError(f"{path}: malformed {UNPACK_INFO_KEY} entry ({type(info).__name__})")
    for key, spec in info.items():
        try:
            parts = [obj.pop(part) for part in spec["slices"]]
            obj[key] = np.concatenate([np.asarray(p).reshape(-1) for p in parts]).reshape(tuple(spec["OriginShape"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: cannot join the split array {key!r} ({type(e).__name__}: {e})") from e
    return obj


def load_pdparams(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A ``.pdparams`` state dict as ``{key: ndarray}``, read without executing anything from the file.

    Raises :class:`UnsafeCheckpointError` when the pickle names anything outside NumPy arrays,
    dtypes, NumPy scalars, ``OrderedDict``, ``_codecs.encode`` and NumPy's protocol-5
    ``_frombuffer``; ``ValueError`` when it is not a pickled dict of arrays. bfloat16 tensors come
    back as Paddle stores them: ``uint16`` arrays.
    """
    path = os.fspath(path)
    obj = restricted_load(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict of arrays (a state dict), found {type(obj).__name__}")
    obj = dict(obj)
    obj.pop(NAME_TABLE_KEY, None)
    obj = _join_split_arrays(obj, path)
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise ValueError(f"{path}: state dict key {key!r} is not a string")
        if isinstance(value, np.generic):
            value = np.asarray(value)
        if not isinstance(value, np.ndarray):
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not an array")
        if value.dtype.hasobject:
            raise ValueError(f"{path}: entry {key!r} is an object array; only numeric arrays are accepted")
        if not value.flags.writeable:  # protocol-5 arrays view the (immutable) pickled bytes
            value = value.copy()
        out[key] = value
    return out
