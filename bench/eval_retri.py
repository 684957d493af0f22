"""Benchmark: ``launch/eval_retri.py`` (:mod:`ernievil2.embeddings_file`) against the plain approach on an
upstream embeddings file.

    python bench/eval_retri.py                     # 5,000 lines × 768-d, 3 rounds
    python bench/eval_retri.py --lines 1000 --rounds 1

Writes a deterministic file (seed 0: random unit text vectors, each image a noisy copy of its
text so the recalls are not trivially 0), then in each round runs, each in a fresh subprocess so
its peak RSS is its own (``os.wait4``):

* ``plain``: per line ``[float(x) for x in s.split()]`` (the upstream ``eval_retri.py``'s parse), one
  full N×N float32 score matrix, a Python loop computing one rank per row (and per column);
* ``eval_retri`` parsing the text, with 1 and with the default number of parser processes: its
  reader (``ernievil2.embeddings_file.read_embeddings(..., sidecars=False)``) and metric code
  (``ernievil2.retrieval.one_to_one_ranks`` + ``seed_recalls``);
* ``eval_retri`` as it runs by default on a file written by launch/infer.py with
  ``write_npy=true``: the ``O.text.npy`` / ``O.image.npy`` sidecars, verified against O
  (``read_embeddings`` default), then the same metric code.

Two files are measured: one written by launch/infer.py (``%+.8e``, fixed width, plus its ``.npy``
sidecars as ``write_npy=true`` writes them) and one written the way the upstream ``run_infer.py``
does (``str()`` of each float32 value, variable width; no sidecars). Times are
taken inside each subprocess around reading + metrics (interpreter start and imports excluded;
the ``process s`` column includes them); ``peak MB`` is the measured process's ``VmHWM``,
``parser proc. MB`` the largest forked parser process (it shares the file's pages with its
parent copy-on-write). The recalls of every run are asserted equal. Prints a Markdown table of
medians over the rounds.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ernievil2.embeddings_file import available_cpus, format_embedding_lines, read_embeddings
from ernievil2.retrieval import one_to_one_ranks, seed_recalls


# --------------------------------------------------------------------------- the measured code
def plain(path: str) -> tuple[list[float], list[float]]:
    """Per-line float parse, full N×N score matrix, per-row rank loop (the original's algorithm)."""
    text, image = [], []
    with open(path) as f:
        for line in f:
            t, i, _ = line.strip("\n").split("\t")
            text.append(np.array([float(x) for x in t.split()]))
            image.append(np.array([float(x) for x in i.split()]))
    text = np.array(text, dtype=np.float32)
    image = np.array(image, dtype=np.float32)
    score = text @ image.T
    n = len(score)
    t2i = np.array([(score[i] > score[i, i]).sum() for i in range(n)])
    score_t = score.T
    i2t = np.array([(score_t[j] > score_t[j, j]).sum() for j in range(n)])

    def recalls(ranks):
        r = [(ranks < k).sum() / float(n) for k in (1, 5, 10)]
        return [float(x) for x in r] + [float((r[0] + r[1] + r[2]) / 3.0)]

    return recalls(t2i), recalls(i2t)


def ours(path: str, workers: int | None, sidecars: bool) -> tuple[list[float], list[float]]:
    """launch/eval_retri.py's reading and metric code (the library calls it makes)."""
    text, image = read_embeddings(path, workers=workers, sidecars=sidecars)
    t2i, i2t = one_to_one_ranks(text, image)
    return seed_recalls(t2i), seed_recalls(i2t)


def _vm_hwm_kb() -> int:
    """Peak RSS of this process (``VmHWM``: fresh after exec, unlike ``ru_maxrss``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _worker(method: str, path: str) -> None:
    start = time.perf_counter()
    if method == "plain":
        t2i, i2t = plain(path)
    elif method == "ours-npy":
        t2i, i2t = ours(path, None, sidecars=True)
    else:
        workers = None if method == "ours-auto" else int(method.split("-")[1])
        t2i, i2t = ours(path, workers, sidecars=False)
    seconds = time.perf_counter() - start
    self_kb = _vm_hwm_kb()
    kids_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"seconds": seconds, "t2i": t2i, "i2t": i2t, "self_kb": self_kb, "children_kb": kids_kb}))


# --------------------------------------------------------------------------- driver
def make_file(path: Path, lines: int, dim: int, fmt: str, seed: int = 0) -> None:
    """``fmt="infer"``: written by ``ernievil2.embeddings_file.format_embedding_lines`` (``%+.8e``, what
    launch/infer.py writes) with the float32 ``PATH.text.npy`` / ``PATH.image.npy`` it writes with
    ``write_npy=true``; ``fmt="seed"``: ``str()`` of each float32, as the upstream
    ``run_infer.py`` writes (variable width)."""
    rng = np.random.default_rng(seed)
    text = rng.standard_normal((lines, dim)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    noise = rng.standard_normal((lines, dim)).astype(np.float32) * np.float32(20.0 / np.sqrt(dim))
    image = text + noise  # float32 throughout: the upstream run_infer.py writes float32 values
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    assert text.dtype == image.dtype == np.float32
    with open(path, "w", encoding="utf-8") as f:
        for a in range(0, lines, 500):
            t, i = text[a : a + 500], image[a : a + 500]
            if fmt == "infer":
                f.write(format_embedding_lines(t, i))
            else:
                f.write("".join(" ".join(map(str, x)) + "\t" + " ".join(map(str, y)) + "\t1\n" for x, y in zip(t, i)))
    if fmt == "infer":
        np.save(f"{path}.text.npy", text)
        np.save(f"{path}.image.npy", image)


def run_one(method: str, path: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--worker", method, str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{method} failed:\n{err}")
    result = json.loads(out.strip().splitlines()[-1])
    result["process_s"] = wall
    return result


LABELS = {
    "plain": "plain: per-line `float()` parse + full N×N score matrix + per-row rank loop",
    "ours-1": "`launch/eval_retri.py` reader + metrics, 1 process",
    "ours-auto": "`launch/eval_retri.py` reader + metrics, default ({n} parser processes)",
    "ours-npy": "`launch/eval_retri.py` default: verified `.npy` sidecars + metrics",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lines", type=int, default=5000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--file", help="keep the generated embeddings file here")
    p.add_argument("--formats", default="infer,seed",
                   help="comma-separated: infer (%%+.8e), seed (str of float32, as the upstream release writes)")
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "FILE"), help=argparse.SUPPRESS)
    p.add_argument("--generate", nargs=2, metavar=("FORMAT", "FILE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(*args.worker)
        return
    if args.generate:
        make_file(Path(args.generate[1]), args.lines, args.dim, args.generate[0])
        return

    tmpdir = tempfile.TemporaryDirectory()
    formats = args.formats.split(",")
    table = []
    for fmt in formats:
        path = Path(args.file + "." + fmt) if args.file else Path(tmpdir.name) / f"embeddings.{fmt}.out"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--lines", str(args.lines), "--dim", str(args.dim),
                        "--generate", fmt, str(path)], check=True)
        size_mb = path.stat().st_size / 2**20
        print(f"{fmt}: generated {path} ({args.lines} lines × {args.dim}-d, {size_mb:.1f} MiB) "
              f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        methods = ["plain", "ours-1", "ours-auto"] + (["ours-npy"] if fmt == "infer" else [])
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for r in range(args.rounds):
            for m in methods:  # interleaved, so a noisy neighbour hits every method alike
                runs[m].append(run_one(m, path))
                print(f"  round {r + 1} {m}: {runs[m][-1]['seconds']:.3f} s, {runs[m][-1]['self_kb'] / 1024:.0f} MB",
                      file=sys.stderr)
        reference = (runs["plain"][0]["t2i"], runs["plain"][0]["i2t"])
        for m in methods:
            for run in runs[m]:
                assert (run["t2i"], run["i2t"]) == reference, f"{m} gives {run['t2i']} {run['i2t']}, plain {reference}"
        base = statistics.median(run["seconds"] for run in runs["plain"])
        for m in methods:
            secs = statistics.median(run["seconds"] for run in runs[m])
            table.append((fmt, size_mb, m, secs, statistics.median(run["process_s"] for run in runs[m]),
                          max(run["self_kb"] for run in runs[m]) / 1024,
                          max(run["children_kb"] for run in runs[m]) / 1024, base / secs))
        print(f"  identical recalls, T2I R@1/5/10 = {', '.join(f'{100 * v:.2f}' for v in reference[0][:3])}",
              file=sys.stderr)

    print(f"\n{args.lines} lines × {args.dim}-d, official 1:1 protocol, median of {args.rounds} round(s), "
          f"{available_cpus()} CPU(s); every run gave identical recalls.\n")
    print("| file | command | time s | process s | peak MB | parser proc. MB | speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|")
    names = {"infer": "written by launch/infer.py (`%+.8e`)", "seed": "upstream writer (`str(float32)`)"}
    for fmt, size_mb, m, secs, proc_s, peak, kids, speed in table:
        label = LABELS[m].format(n=available_cpus())
        kid = f"{kids:.0f}" if m == "ours-auto" and kids else "–"
        print(f"| {names[fmt]}, {size_mb:.0f} MiB | {label} | {secs:.2f} | {proc_s:.2f} | {peak:.0f} | {kid} | {speed:.1f}× |")
    tmpdir.cleanup()


if __name__ == "__main__":
    main()
