"""How far apart a freshly initialised model puts different inputs, per init scheme.

    python bench/init_spread.py                       # tiny, seeds 0-2, both schemes
    python bench/init_spread.py --seeds 0 1 2 3 --n 64 --out outputs/bench/init_spread.json

For each ``model.{vision,text}.init`` scheme and model seed: the mean (and largest) cosine
similarity between the embeddings of different held-out demo scenes (images) and of their first
English captions, tokenised with a WordPiece vocab built from those captions. A value near 1 means
every input starts at nearly the same vector, where a short contrastive run can stall
(docs/BENCHMARKS.md, "Why short runs stall").
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import paddle

from ernievil2.data.demo import all_captions, render_scene, val_scenes
from ernievil2.encode import embed_crops, embed_token_ids
from ernievil2.models import build_model
from ernievil2.models.config import INIT_SCHEMES, model_config
from ernievil2.tokenizer import WordPieceTokenizer


def off_diagonal_cosines(emb: np.ndarray) -> np.ndarray:
    """Cosine similarities between different rows of L2-normalised ``emb``."""
    sims = emb.astype(np.float64) @ emb.T.astype(np.float64)
    return sims[~np.eye(len(emb), dtype=bool)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=32, help="held-out demo scenes")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()

    scenes = val_scenes(args.n, seed=0)
    base = model_config(args.preset)
    rng = np.random.default_rng(0)
    crops = np.stack([render_scene(s, rng, base.vision.image_size) for s in scenes])
    captions = [all_captions(s, "en")[0] for s in scenes]
    with tempfile.TemporaryDirectory() as tmp:
        vocab = WordPieceTokenizer.build_vocab(captions, Path(tmp) / "vocab.txt", 1000)
        ids = WordPieceTokenizer(vocab, max_length=32)(captions)

    rows = []
    for scheme in INIT_SCHEMES:
        for seed in args.seeds:
            paddle.seed(seed)
            model = build_model(model_config(args.preset, vision={"init": scheme}, text={"init": scheme}))
            img = off_diagonal_cosines(embed_crops(model, crops))
            txt = off_diagonal_cosines(embed_token_ids(model, ids))
            rows.append({"init": scheme, "seed": seed, "image_mean": float(img.mean()), "image_max": float(img.max()),
                         "caption_mean": float(txt.mean()), "caption_max": float(txt.max())})
    print("| init | seed | images: mean cos | max | captions: mean cos | max |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['init']} | {r['seed']} | {r['image_mean']:.4f} | {r['image_max']:.4f} "
              f"| {r['caption_mean']:.4f} | {r['caption_max']:.4f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
