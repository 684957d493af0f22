"""Retrieval recalls of an upstream embeddings file (``text_emb \\t image_emb \\t 1`` per line), printed as
the upstream ERNIE-ViL 2.0 release's ``eval_retri.py`` table.

    python launch/eval_retri.py O                            # official 1:1 protocol
    python launch/eval_retri.py O --protocol multi           # group by image id (ids: O.ids.txt)
    python launch/eval_retri.py O --protocol multi --ids IDS # or --test-file the upstream evaluation file

``official``: line i's text and line i's image are the only pair; rank = #{j : S[i,j] > S[i,i]}
(strict ``>``: ties favour the ground truth), numbers equal to the original per-line script
(:func:`ernievil2.retrieval.one_to_one_ranks`). ``multi``: images deduplicated by id (the first
embedding of each id is kept), every text's ground truth is its line's image id
(:func:`ernievil2.retrieval.multi_caption_recall`).

When launch/infer.py also wrote ``O.text.npy`` / ``O.image.npy`` (``write_npy=true``), the
embeddings are taken from them once they are shown to hold exactly O's values; ``--no-npy`` always
parses O. Reading and evaluation: :mod:`ernievil2.embeddings_file`. NumPy only; Paddle is not
imported.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ernievil2.embeddings_file import evaluate_embeddings_file, read_ids, read_test_file_ids


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, print the protocol line and the table; return the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("embeddings", help="upstream embeddings file (text_emb \\t image_emb \\t 1 per line)")
    p.add_argument("--protocol", choices=("official", "multi"), default="official")
    p.add_argument("--ids", help="image ids, one per line (multi protocol; default: EMBEDDINGS.ids.txt)")
    p.add_argument("--test-file", help="upstream evaluation file to take the image ids from (multi protocol)")
    p.add_argument("--workers", type=int, default=None, help="parser processes (default: CPU count)")
    p.add_argument("--chunk", type=int, default=2048, help="score tile size (rows and columns)")
    p.add_argument("--no-npy", action="store_true",
                   help="always parse EMBEDDINGS, even when verified EMBEDDINGS.text.npy/.image.npy exist")
    args = p.parse_args(argv)

    ids = None
    try:
        if args.protocol == "multi":
            if args.ids and args.test_file:
                p.error("give --ids or --test-file, not both")
            if args.test_file:
                ids = read_test_file_ids(args.test_file)
            else:
                ids_path = args.ids or f"{args.embeddings}.ids.txt"
                if not os.path.isfile(ids_path):
                    p.error(f"--protocol multi needs image ids: {ids_path} not found (give --ids FILE or --test-file FILE)")
                ids = read_ids(ids_path)
        table, info = evaluate_embeddings_file(args.embeddings, args.protocol, ids, args.workers, args.chunk,
                                               sidecars=not args.no_npy)
    except (OSError, ValueError) as exc:
        print(f"eval_retri.py: error: {exc}", file=sys.stderr)
        return 2
    label = "official 1:1" if args.protocol == "official" else "multi-caption"
    source = " (read from the verified .npy sidecars)" if info["source"] == "npy" else ""
    print(f"{label} protocol: {info['texts']} texts, {info['images']} images{source}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
