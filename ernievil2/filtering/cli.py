"""The command line of ``launch/filter.py``: ``score`` shards with a checkpoint, ``select`` the pairs
to keep. Exit status of :func:`main`: 0 done, 2 unusable input or options."""
from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    from ernievil2.device import BACKENDS, PRECISIONS

    p = argparse.ArgumentParser(prog="filter.py", description="Score image-text pairs with a checkpoint and keep "
                                                              "the best (docs/DATA.md, 'Filter by the model').")
    sub = p.add_subparsers(dest="command", required=True)
    sc = sub.add_parser("score", help="cosine of every caption with its image, one sidecar per shard (resumable)")
    sc.add_argument("--ckpt", required=True, help="checkpoint: ours, a run folder, official .pdparams or PaddleNLP folder")
    sc.add_argument("--shards", required=True, help="shards: folder, brace pattern, glob, http(s):// or pipe: URL")
    sc.add_argument("--out", required=True, help="folder for the score sidecars")
    sc.add_argument("--vocab", help="WordPiece vocab.txt (default: vocab.txt in or beside --ckpt)")
    sc.add_argument("--batch-size", type=int, default=64, help="pairs per forward pass (default %(default)s)")
    sc.add_argument("--workers", type=int, default=2, help="image-decoding threads (default %(default)s)")
    sc.add_argument("--text-max-length", type=int, default=64, help="tokens per caption (default %(default)s)")
    sc.add_argument("--profile", default="official", choices=("official", "paddlenlp"),
                    help="image preprocessing (ernievil2.data.preprocess; default %(default)s)")
    sc.add_argument("--captions", default="all", choices=("all", "first"),
                    help="score every caption of a sample, or its first only (faster; default %(default)s)")
    sc.add_argument("--embeddings", action="store_true", help="also keep float16 image and caption embeddings")
    sc.add_argument("--device", default="auto", help="auto | cpu | gpu | gpu:N (default %(default)s)")
    sc.add_argument("--backend", default="auto", choices=BACKENDS, help="auto: Paddle Inference with oneDNN on "
                    "CPU, dygraph on a GPU (default %(default)s)")
    sc.add_argument("--precision", default="fp32", choices=PRECISIONS, help="bf16: oneDNN bfloat16 on CPUs "
                    "that have it, ~2x faster, scores change by ~1e-3 (default %(default)s)")
    sc.add_argument("--no-progress", action="store_true", help="no progress bar")
    se = sub.add_parser("select", help="a global cut over all sidecars: keep a fraction, or a score threshold")
    se.add_argument("scores", help="the sidecar folder `score` wrote")
    cut = se.add_mutually_exclusive_group(required=True)
    cut.add_argument("--fraction", type=float, help="keep this share of all pairs, best first (DataComp: 0.3)")
    cut.add_argument("--threshold", type=float, help="keep pairs scoring at least this (model-specific)")
    se.add_argument("--by", default="first", choices=("first", "max", "mean"),
                    help="a sample's score: its first caption's, or the max / mean over its captions")
    se.add_argument("--per-source", action="store_true", help="apply the fraction within each source folder")
    se.add_argument("--out", required=True, help="kept keys, one per line (summary: OUT.summary.json, "
                                                  "histogram: OUT.hist.png)")
    return p


def run_score(args: argparse.Namespace) -> int:
    from ernievil2.distributed import dist_info
    from ernievil2.filtering.score import ScoreOptions, score_shards
    from ernievil2.search import load_encoder

    # Ranks share no tensors (each scores its own shards): no process group is needed; under the
    # launcher each process still sees only its own GPU.
    info = dist_info()
    encoder = load_encoder(args.ckpt, args.vocab, profile=args.profile, text_max_length=args.text_max_length,
                           device=args.device, backend=args.backend, precision=args.precision)
    options = ScoreOptions(batch_size=args.batch_size, workers=args.workers, keep_embeddings=args.embeddings,
                           captions=args.captions,
                           progress=False if args.no_progress else None)
    report = score_shards(args.shards, args.out, encoder, options, info)
    prefix = f"rank {info.rank}: " if info.distributed else ""
    print(prefix + report.summary())
    return 0


def run_select(args: argparse.Namespace) -> int:
    from ernievil2.filtering.select import read_scores, select_keys, write_selection

    shards = read_scores(args.scores)
    selection = select_keys(shards, fraction=args.fraction, threshold=args.threshold, by=args.by,
                            per_source=args.per_source)
    summary = selection.summary(args.fraction, args.threshold, args.by)
    paths = write_selection(selection, args.out, summary)
    cuts = ", ".join(f"{name} {value:.4f}" for name, value in selection.thresholds.items())
    print(f"kept {len(selection.keys)} of {selection.total} pair(s) ({summary['kept_fraction']:.1%}); "
          f"threshold: {cuts}; wrote {', '.join(map(str, paths))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command; return the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ernievil2.filtering.sidecar import FilterError
    from ernievil2.search.identity import SearchError

    try:
        return run_score(args) if args.command == "score" else run_select(args)
    except (FilterError, SearchError) as exn:
        print(f"filter.py: error: {exn}", file=sys.stderr)
        return 2
