"""Search your photos by text or by image with a trained ERNIE-ViL 2.0 dual encoder.

    python launch/search.py index --images ~/Pictures --ckpt outputs/demo/RUN/checkpoints/step_0000600 --out photos.index
    python launch/search.py query photos.index "红色的圆形" --k 10 --html results.html
    python launch/search.py query photos.index --image query.jpg --exact

``index`` embeds every jpg/jpeg/png/webp/bmp/gif under --images (recursively) into --out; run it
again to add only new files. From --min-ann-size vectors (--ann auto, with faiss installed) it also
builds an approximate IVF index, prints its recall@10 against exact search, and ``query`` uses it
(--exact: NumPy's exact search; --faiss: faiss's exact flat index). ``query`` loads the checkpoint
the index remembers (--ckpt / --vocab override it; a different model or vocab is refused) and
prints rank, score and path. The index layout and the library API: ernievil2/search/. Exit status:
0 done, 2 unusable input or options.
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings

from ernievil2.device import BACKENDS, PRECISIONS
from ernievil2.threads import use_all_cpu_threads

use_all_cpu_threads()  # before Paddle is imported, as launch/infer.py


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(prog="search.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    ix = sub.add_parser("index", help="embed a photo folder into an index (resumable)")
    ix.add_argument("--images", required=True, help="photo folder, searched recursively")
    ix.add_argument("--ckpt", required=True, help="checkpoint: ours, a run folder, official .pdparams or PaddleNLP folder")
    ix.add_argument("--out", required=True, help="index folder (created, or extended with new files)")
    ix.add_argument("--vocab", help="WordPiece vocab.txt (default: vocab.txt in or beside --ckpt)")
    ix.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default %(default)s)")
    ix.add_argument("--profile", default="official", choices=("official", "paddlenlp"),
                    help="image preprocessing (ernievil2.data.preprocess; default %(default)s)")
    ix.add_argument("--workers", type=int, default=2, help="image decoding threads (default %(default)s)")
    ix.add_argument("--device", default="auto", help="auto | cpu | gpu | gpu:N (default %(default)s)")
    ix.add_argument("--no-progress", action="store_true", help="no progress bar")
    ix.add_argument("--backend", default="auto", choices=BACKENDS, help="what embeds: auto = Paddle Inference with "
                    "oneDNN on CPU, dygraph on a GPU (default %(default)s)")
    ix.add_argument("--precision", default="fp32", choices=PRECISIONS, help="bf16: oneDNN bfloat16 on CPUs that have "
                    "it, about 2x faster; vectors move by ~1e-3 (default %(default)s)")
    ix.add_argument("--ann", default="auto", choices=("auto", "off", "ivf"),
                    help="approximate IVF index (faiss): auto from --min-ann-size vectors, ivf always, off never "
                         "(default %(default)s)")
    ix.add_argument("--min-ann-size", type=int, default=None, metavar="N",
                    help="--ann auto builds it from N vectors (default: 100000, where an exact query takes ~10 ms)")
    q = sub.add_parser("query", help="top-k images for a text or an image")
    q.add_argument("index", help="index folder written by `index`")
    q.add_argument("text", nargs="?", help="query text")
    q.add_argument("--image", help="query image instead of a text")
    q.add_argument("--ckpt", help="checkpoint (default: the one the index was built with)")
    q.add_argument("--vocab", help="WordPiece vocab.txt (default: in or beside the checkpoint, else the index's)")
    q.add_argument("--k", type=int, default=10, help="number of results (default %(default)s)")
    q.add_argument("--html", help="also write a gallery page of the results here")
    how = q.add_mutually_exclusive_group()
    how.add_argument("--exact", action="store_true", help="exact NumPy search even when the index has an approximate one")
    how.add_argument("--faiss", action="store_true", help="exact search with faiss's flat index (pip install -e '.[search]')")
    q.add_argument("--device", default="auto", help="auto | cpu | gpu | gpu:N (default %(default)s)")
    q.add_argument("--backend", default="auto", choices=BACKENDS, help="what embeds the query (default %(default)s)")
    return p


def run_index(args: argparse.Namespace) -> None:
    from ernievil2.search import DEFAULT_MIN_ANN_SIZE, SearchError, build_index, load_encoder

    min_ann_size = DEFAULT_MIN_ANN_SIZE if args.min_ann_size is None else args.min_ann_size
    if min_ann_size < 0:
        raise SearchError(f"--min-ann-size must be >= 0, got {min_ann_size}")
    encoder = load_encoder(args.ckpt, args.vocab, profile=args.profile, device=args.device, backend=args.backend,
                           precision=args.precision)
    report = build_index(args.images, args.out, encoder, batch_size=args.batch_size, num_workers=args.workers,
                         progress=not args.no_progress, ann=args.ann, min_ann_size=min_ann_size)
    print(report.summary())


def run_query(args: argparse.Namespace) -> None:
    from ernievil2.search import SearchError, encoder_for_index, load_index, query_image, query_text, write_html

    if (args.text is None) == (args.image is None):
        raise SearchError("give a query text or --image PATH (one of them)")
    index = load_index(args.index)
    encoder = encoder_for_index(index, args.ckpt, args.vocab, device=args.device, backend=args.backend)
    backend, note = index.backend_for("faiss" if args.faiss else "numpy" if args.exact else "auto")
    if note:
        print(f"search.py: note: {note}", file=sys.stderr)
    if args.image is not None:
        hits = query_image(index, encoder, args.image, args.k, backend)
    else:
        hits = query_text(index, encoder, args.text, args.k, backend)
    for rank, hit in enumerate(hits, start=1):
        print(f"{rank}\t{hit.score:.4f}\t{hit.path}")
    if args.html:
        print(f"wrote {write_html(hits, args.html, query=args.text, query_image=args.image)}")


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the subcommand; return the exit status."""
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message="No ccache found")  # paddle's import-time notice
    import paddle  # noqa: F401  (imported here: it installs an INFO root log handler, quietened below)

    from ernievil2.search import SearchError

    logging.getLogger().setLevel(logging.WARNING)
    try:
        run_index(args) if args.command == "index" else run_query(args)
    except SearchError as exn:
        message = "; ".join(line.strip() for line in str(exn).splitlines() if line.strip())
        print(f"search.py: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
