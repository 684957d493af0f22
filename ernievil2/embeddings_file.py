"""The upstream embeddings file: its writer, its readers and its evaluation (CLI: ``launch/eval_retri.py``).

Format (as the upstream ERNIE-ViL 2.0 release's ``run_infer.py`` writes it and its ``eval_retri.py``
reads it): one line per pair, ``text_emb \\t image_emb \\t 1``, each embedding space-separated floats.
:func:`format_embedding_lines` writes every value as ``%+.8e`` (9 significant digits: the exact
float32 reads back), a fixed-width layout the reader parses vectorised; files written any other
way (e.g. ``run_infer.py``'s ``str()`` of each float32) are parsed in bulk (one ``np.fromstring`` per
block of lines, in parallel worker processes for big files). Beside ``O`` (:func:`sidecar_paths`):
``O.ids.txt`` (the image id of every line), ``O.text.npy`` / ``O.image.npy`` (float32 ``[N, D]``)
and ``O.skipped.tsv``. The ``.npy`` sidecars are read instead of ``O`` only once they are shown to
hold exactly ``O``'s values (:func:`read_verified_sidecars`).

A malformed file raises :class:`EmbeddingsFormatError` naming the first bad line. NumPy only;
Paddle is not imported.
"""
from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ernievil2.retrieval import (
    format_seed_table,
    group_by_image_id,
    multi_caption_recall,
    one_to_one_ranks,
    seed_recalls,
    seed_table_from_metrics,
)
from ernievil2.threads import available_cpus

__all__ = [
    "EmbeddingsFormatError", "format_embedding_lines", "sidecar_paths", "SIDECAR_SUFFIXES",
    "read_verified_sidecars", "read_embeddings", "read_ids", "read_test_file_ids", "available_cpus",
    "evaluate_embeddings_file",
]


class EmbeddingsFormatError(ValueError):
    """The embeddings file is not in the upstream embeddings format; names the line."""


PARALLEL_MIN_BYTES = 16 << 20  # parse files above this size in worker processes too
BLOCK_BYTES = 4 << 20  # lines are parsed in blocks of about this many bytes


# --------------------------------------------------------------------------- writing
def format_embedding_lines(text_emb: np.ndarray, image_emb: np.ndarray) -> str:
    """Upstream embeddings lines (``text \\t image \\t 1\\n`` each) for float32 ``[B, D]`` arrays; every
    value ``%+.8e`` (15 characters, e.g. ``-1.23456789e-02``): 9 significant digits read back the
    exact float32."""
    if text_emb.shape != image_emb.shape or text_emb.ndim != 2:
        raise ValueError(f"text and image embeddings must both be [B, D], got {text_emb.shape} and {image_emb.shape}")
    fmt = " ".join(["%+.8e"] * text_emb.shape[1])
    return "".join(
        f"{fmt % tuple(t)}\t{fmt % tuple(i)}\t1\n"
        for t, i in zip(text_emb.astype(np.float64).tolist(), image_emb.astype(np.float64).tolist())
    )


#: Suffixes of the float32 ``[N, D]`` sidecars of ``O`` (text, image), written with ``write_npy=true``.
SIDECAR_SUFFIXES = (".text.npy", ".image.npy")


def sidecar_paths(output_file: str | os.PathLike) -> dict[str, Path]:
    """Files written beside the embeddings file ``O``."""
    o = str(output_file)
    return {
        "ids": Path(o + ".ids.txt"),
        "text_npy": Path(o + SIDECAR_SUFFIXES[0]),
        "image_npy": Path(o + SIDECAR_SUFFIXES[1]),
        "skipped": Path(o + ".skipped.tsv"),
    }


# --------------------------------------------------------------------------- reading
def _check_line(line: bytes, dim: int) -> str | None:
    """Why ``line`` is not ``dim`` floats TAB ``dim`` floats TAB one field, or ``None``."""
    cols = line.split(b"\t")
    if len(cols) != 3:
        return f"expected 3 tab-separated columns, found {len(cols)}"
    for name, col in (("text", cols[0]), ("image", cols[1])):
        try:
            vals = [float(x) for x in col.split()]
        except ValueError as exc:
            return f"{name} embedding: {exc}"
        if len(vals) != dim:
            return f"{name} embedding has {len(vals)} values, expected {dim}"
    if len(cols[2].split()) != 1:
        return "the third column must be one field (the upstream release writes 1)"
    return None


class _BadLine(Exception):
    """A bad line found by a parser, before the file name and the 1-based number are known."""

    def __init__(self, index: int, why: str):  # index: 0-based, relative to the parsed range
        super().__init__(why)
        self.index, self.why = index, why


def _parse_block(block: bytes, dim: int, first_line: int = 0) -> np.ndarray:
    """``[n_lines, 2 * dim + 1]`` float64 from whole lines (``first_line``: index of the first one).

    All numbers of the block are read by ONE ``np.fromstring`` (any whitespace separates, so tabs
    and newlines need no splitting); the column structure is checked per line with C-level byte
    counts (two tabs, ``dim - 1`` single spaces in each embedding), and only a line failing that
    quick check is examined the slow way (it may merely hold extra spaces).
    """
    lines = block.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    spaces = dim - 1
    for k, line in enumerate(lines):
        t1 = line.find(b"\t")
        t2 = line.find(b"\t", t1 + 1) if t1 >= 0 else -1
        if (
            t2 < 0
            or line.count(b" ", 0, t1) != spaces
            or line.count(b" ", t1 + 1, t2) != spaces
            or line.find(b"\t", t2 + 1) >= 0
            or line.find(b" ", t2 + 1) >= 0
        ):
            why = _check_line(line.rstrip(b"\r"), dim) if line.strip() else "empty line"
            if why:
                raise _BadLine(first_line + k, why)
    try:
        with warnings.catch_warnings():
            # "could not be read to its end": a DeprecationWarning in older NumPy, an error in newer
            warnings.simplefilter("error", DeprecationWarning)
            values = np.fromstring(block, dtype=np.float64, sep=" ")
    except (ValueError, DeprecationWarning):
        values = None
    width = 2 * dim + 1
    if values is None or values.size != len(lines) * width:
        for k, line in enumerate(lines):  # a token float() accepts but fromstring does not
            why = _check_line(line.rstrip(b"\r"), dim)
            if why:
                raise _BadLine(first_line + k, why)
        values = np.array([[float(x) for x in line.split()] for line in lines], dtype=np.float64)
    return values.reshape(len(lines), width)


# Fixed-width layout written by format_embedding_lines: every value "%+.8e"
# ("+1.23456789e-02", 15 bytes), one space between values, "\t1\n" at the end of the line.
_TOKEN = 16  # 15 characters + the separator after it
_POW10 = np.array([float(10**k) for k in range(23)])  # exact doubles


def _u64(x: int) -> np.uint64:
    return np.uint64(x)


def _fixed_values(tokens: np.ndarray) -> np.ndarray | None:
    """float64 values of ``[T, 16]`` uint8 tokens in the ``%+.8e`` layout, or ``None`` when one
    does not follow it.

    Each token is read as two little-endian 64-bit words and decoded with SWAR arithmetic (all
    eight digits after the point at once). Exact: the 9-digit mantissa is an integer (exact in
    float64) scaled by one multiplication or division by an exact power of ten — a single
    rounding, the same double as ``float(token)``.
    """
    words = np.ascontiguousarray(tokens).view("<u8").reshape(-1, 2)
    w0, w1 = words[:, 0], words[:, 1]  # "s d . d d d d d" and "d d d e s x x sep"
    lo8 = _u64(0xFF)
    sign = w0 & lo8
    esign = (w1 >> _u64(32)) & lo8
    ok = ((w0 >> _u64(16)) & lo8) == _u64(0x2E)  # '.'
    ok &= ((w1 >> _u64(24)) & lo8) == _u64(0x65)  # 'e'
    ok &= (sign == _u64(0x2B)) | (sign == _u64(0x2D))
    ok &= (esign == _u64(0x2B)) | (esign == _u64(0x2D))
    # the 8 digits after the point as one word (first digit in the low byte), plus the 3 others
    frac = (w0 >> _u64(24)) | (w1 << _u64(40))
    high, three, six = _u64(0xF0F0F0F0F0F0F0F0), _u64(0x3030303030303030), _u64(0x0606060606060606)
    ok &= ((frac & high) == three) & (((frac + six) & high) == three)
    lead = (w0 >> _u64(8)) & lo8
    e1 = (w1 >> _u64(40)) & lo8
    e2 = (w1 >> _u64(48)) & lo8
    for digit in (lead, e1, e2):
        ok &= (digit >= _u64(0x30)) & (digit <= _u64(0x39))
    if not ok.all():
        return None
    v = frac - three
    v = (v * _u64(10) + (v >> _u64(8))) & _u64(0x00FF00FF00FF00FF)
    v = (v * _u64(100) + (v >> _u64(16))) & _u64(0x0000FFFF0000FFFF)
    v = (v * _u64(10000) + (v >> _u64(32))) & _u64(0x00000000FFFFFFFF)
    mantissa = ((lead - _u64(0x30)) * _u64(100_000_000) + v).astype(np.float64)
    exponent = ((e1 - _u64(0x30)) * _u64(10) + (e2 - _u64(0x30))).astype(np.int64)
    k = np.where(esign == _u64(0x2D), -exponent, exponent) - 8
    if np.abs(k).max(initial=0) > 22:
        return None  # |value| < 1e-14 or >= 1e31: left to the general parser
    scale = _POW10[np.abs(k)]
    values = np.where(k < 0, mantissa / scale, mantissa * scale)
    return np.where(sign == _u64(0x2D), -values, values)


def _parse_fixed_block(block: bytes, dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Vectorised parse of whole lines in the fixed-width layout; ``None`` when the block is not
    entirely in it (then the general parser reads it)."""
    width = 2 * dim * _TOKEN + 2  # two columns of tokens (the last of each ends in a tab), "1", "\n"
    if not block or len(block) % width:
        return None
    rows = np.frombuffer(block, dtype=np.uint8).reshape(-1, width)
    text = rows[:, : dim * _TOKEN].reshape(-1, dim, _TOKEN)
    image = rows[:, dim * _TOKEN : 2 * dim * _TOKEN].reshape(-1, dim, _TOKEN)
    if not (
        (rows[:, -1] == 10).all() and (rows[:, -2] == 49).all()
        and (text[:, -1, 15] == 9).all() and (image[:, -1, 15] == 9).all()
        and (text[:, :-1, 15] == 32).all() and (image[:, :-1, 15] == 32).all()
    ):
        return None
    n = len(rows)
    t = _fixed_values(text.reshape(-1, _TOKEN))
    i = _fixed_values(image.reshape(-1, _TOKEN)) if t is not None else None
    if t is None or i is None:
        return None
    return t.astype(np.float32).reshape(n, dim), i.astype(np.float32).reshape(n, dim)


def _blocks(f, start: int, stop: int):
    """Blocks of whole lines (about :data:`BLOCK_BYTES` each) of the file's bytes ``[start, stop)``."""
    f.seek(start)
    pos, carry = start, b""
    while pos < stop:
        chunk = f.read(min(BLOCK_BYTES, stop - pos))
        if not chunk:
            break
        pos += len(chunk)
        data = carry + chunk
        if pos < stop:
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # a line longer than a block
                carry = data
                continue
            yield data[:cut]
            carry = data[cut:]
        else:
            yield data
            carry = b""
    if carry:
        yield carry


def _parse_range(path: str, start: int, stop: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse the whole lines in bytes ``[start, stop)`` of ``path``, block by block, into float32
    arrays (rounded from float64, as the original's ``float()`` then ``np.float32``). Raises
    :class:`_BadLine` with the line's index relative to ``start``."""
    texts, images = [], []
    index = 0
    with open(path, "rb") as f:
        for block in _blocks(f, start, stop):
            fixed = _parse_fixed_block(block, dim)
            if fixed is not None:
                texts.append(fixed[0])
                images.append(fixed[1])
                index += len(fixed[0])
            else:
                values = _parse_block(block, dim, index)
                texts.append(values[:, :dim].astype(np.float32))
                images.append(values[:, dim : 2 * dim].astype(np.float32))
                index += len(values)
    if not texts:
        empty = np.empty((0, dim), dtype=np.float32)
        return empty, empty
    return np.concatenate(texts), np.concatenate(images)


def _parse_child(path: str, start: int, stop: int, dim: int, conn) -> None:
    """Worker process (forked; reads its own byte range of the file)."""
    try:
        conn.send(("ok", _parse_range(path, start, stop, dim)))
    except _BadLine as exc:
        conn.send(("bad", (exc.index, exc.why)))
    except BaseException as exc:  # noqa: BLE001 - any failure in the child is sent to the parent
        conn.send(("error", f"parser process failed: {exc!r}"))
    finally:
        conn.close()


def _count_lines(path: str, stop: int) -> int:
    """Newlines in bytes ``[0, stop)`` (only needed to number a bad line)."""
    n = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(min(BLOCK_BYTES, stop - f.tell())), b""):
            n += block.count(b"\n")
    return n


def _parse_parallel(path: str, start: int, stop: int, dim: int, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut bytes ``[start, stop)`` at line ends into ``workers`` ranges: the first is parsed here,
    the others in forked processes at the same time."""
    import multiprocessing as mp

    cuts = [start]
    with open(path, "rb") as f:
        for k in range(1, workers):
            f.seek(max(start + (stop - start) * k // workers, cuts[-1]))
            f.readline()
            cuts.append(min(f.tell(), stop))
    cuts.append(stop)
    ranges = [(a, b) for a, b in itertools.pairwise(cuts) if b > a]
    ctx = mp.get_context("fork")
    children = []
    try:
        for a, b in ranges[1:]:
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_parse_child, args=(path, a, b, dim, send), daemon=True)
            proc.start()
            send.close()
            children.append((proc, recv))
        results = []
        try:
            results.append(("ok", _parse_range(path, ranges[0][0], ranges[0][1], dim)))
        except _BadLine as exc:
            results.append(("bad", (exc.index, exc.why)))
        for proc, recv in children:
            try:
                results.append(recv.recv())
            except EOFError:
                results.append(("error", "parser process died"))
    finally:
        for proc, recv in children:
            recv.close()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    for (a, _), (status, payload) in zip(ranges, results):  # file order: the first bad line wins
        if status == "bad":
            index, why = payload
            raise _BadLine(_count_lines(path, a) - _count_lines(path, start) + index, why)
        if status == "error":
            raise EmbeddingsFormatError(payload)
    return np.concatenate([p[0] for _, p in results]), np.concatenate([p[1] for _, p in results])


def _header(path: str) -> tuple[int, int, int]:
    """``(start, size, dim)``: the offset of line 1 (after a UTF-8 BOM), the file size and the
    embedding width read from line 1."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(3)
        start = 3 if head == b"\xef\xbb\xbf" else 0
        f.seek(start)
        first = f.readline().rstrip(b"\n").rstrip(b"\r")
    if size <= start:
        raise EmbeddingsFormatError(f"{path}: no embeddings")
    cols = first.split(b"\t")
    if len(cols) != 3:
        raise EmbeddingsFormatError(f"{path}: line 1: expected 3 tab-separated columns, found {len(cols)}")
    dim = len(cols[0].split())
    if dim == 0:
        raise EmbeddingsFormatError(f"{path}: line 1: empty text embedding")
    return start, size, dim


SIDECAR_CHECK_LINES = 64  # lines of O compared bit for bit with the sidecar rows


def read_verified_sidecars(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray] | None:
    """``(text, image)`` from ``O.text.npy`` / ``O.image.npy`` when they hold exactly ``O``'s values,
    else ``None`` (then ``O`` is parsed).

    Accepted only when ``O`` is in launch/infer.py's fixed-width layout with exactly as many lines
    as the arrays have rows (checked from its size, nothing else can match it), both arrays are
    float32 ``[N, D]`` of O's width, and :data:`SIDECAR_CHECK_LINES` lines of ``O`` — the first,
    the last and evenly spaced ones — parse to the same bits as their rows. Modification times
    are not used: infer.py renames the sidecars into place just before ``O``, so a stale pair is
    older too, and only the content tells them apart.
    """
    path = str(path)
    files = [path + suffix for suffix in SIDECAR_SUFFIXES]
    if not all(os.path.isfile(f) for f in files):
        return None
    start, size, dim = _header(path)
    try:
        text, image = (np.load(f, allow_pickle=False) for f in files)
    except (OSError, ValueError):
        return None
    if not (text.dtype == image.dtype == np.float32 and text.ndim == 2 and text.shape == image.shape
            and text.shape[1] == dim):
        return None
    n, width = len(text), 2 * dim * _TOKEN + 2
    if n == 0 or size - start != n * width:
        return None
    with open(path, "rb") as f:
        for k in np.unique(np.linspace(0, n - 1, min(n, SIDECAR_CHECK_LINES)).round().astype(np.int64)):
            f.seek(start + int(k) * width)
            parsed = _parse_fixed_block(f.read(width), dim)
            if parsed is None or not (np.array_equal(parsed[0][0].view(np.uint32), text[k].view(np.uint32))
                                      and np.array_equal(parsed[1][0].view(np.uint32), image[k].view(np.uint32))):
                return None
    return text, image


def read_embeddings(
    path: str | os.PathLike, workers: int | None = None, sidecars: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """``(text, image)`` float32 ``[N, D]`` from an upstream embeddings file.

    With ``sidecars`` the verified ``.npy`` files of :func:`read_verified_sidecars` are used when
    present. Otherwise the file is streamed in blocks of lines (it is never held whole in memory);
    files above :data:`PARALLEL_MIN_BYTES` are split among ``workers`` processes (default: the
    CPUs this process may use; 1 disables). Raises :class:`EmbeddingsFormatError` naming the
    first bad line.
    """
    path = str(path)
    if sidecars:
        arrays = read_verified_sidecars(path)
        if arrays is not None:
            return arrays
    start, size, dim = _header(path)
    workers = available_cpus() if workers is None else max(1, int(workers))
    try:
        if workers == 1 or size < PARALLEL_MIN_BYTES:
            return _parse_range(path, start, size, dim)
        return _parse_parallel(path, start, size, dim, workers)
    except _BadLine as exc:
        raise EmbeddingsFormatError(f"{path}: line {exc.index + 1}: {exc.why}") from None


def read_ids(path: str | os.PathLike) -> list[str]:
    """One image id per line (``O.ids.txt``)."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f]


def read_test_file_ids(path: str | os.PathLike) -> list[str]:
    """The image id column (2nd) of an upstream evaluation file, without decoding anything."""
    ids = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            cols = raw.split(b"\t", 2)
            if len(cols) < 3:
                raise EmbeddingsFormatError(f"{path}: line {lineno}: expected 3 tab-separated columns")
            ids.append(cols[1].decode("utf-8").strip())
    return ids


# --------------------------------------------------------------------------- evaluation
def evaluate_embeddings_file(
    path: str | os.PathLike,
    protocol: str = "official",
    ids: Sequence[str] | None = None,
    workers: int | None = None,
    chunk: int = 2048,
    sidecars: bool = True,
) -> tuple[str, dict]:
    """Read the embeddings file ``path`` and compute the upstream ``eval_retri.py`` table of
    ``protocol``: ``official`` (line i's text and image are the only pair) or ``multi``
    (images deduplicated by ``ids``, one image id per line). Returns ``(table_text, info)``;
    ``info["source"]`` is ``"npy"`` when the verified sidecars were read, else ``"text"``."""
    if protocol not in ("official", "multi"):
        raise ValueError(f"unknown protocol {protocol!r}; choose official or multi")
    if protocol == "multi" and ids is None:
        raise ValueError("the multi protocol needs the image id of every line")
    arrays = read_verified_sidecars(path) if sidecars else None
    source = "text" if arrays is None else "npy"
    text, image = arrays if arrays is not None else read_embeddings(path, workers, sidecars=False)
    if protocol == "official":
        t2i, i2t = one_to_one_ranks(text, image, chunk)
        t2i_r, i2t_r = seed_recalls(t2i), seed_recalls(i2t)
        info = {"protocol": "official", "texts": len(text), "images": len(image), "t2i": t2i_r, "i2t": i2t_r,
                "source": source}
        return format_seed_table(t2i_r, i2t_r), info
    assert ids is not None
    if len(ids) != len(text):
        raise ValueError(
            f"{len(ids)} image ids for {len(text)} embedding lines (if inference skipped bad lines, "
            "use the O.ids.txt it wrote, not the test file)"
        )
    images, text_image, unique = group_by_image_id(ids, image)
    metrics = multi_caption_recall(images, text, text_image, chunk)
    info = {"protocol": "multi", "texts": len(text), "images": len(unique), "source": source, **metrics}
    return seed_table_from_metrics(metrics), info
