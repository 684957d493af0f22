"""Search against the evaluator on the demo's held-out images, with a trained demo checkpoint.

    python bench/search_recall.py outputs/demo/RUN/checkpoints/step_0000600
    python bench/search_recall.py CKPT --quick      # smoke run: 16 held-out images of a 64-scene demo

Writes the 500 held-out images (``data.demo`` defaults) to a folder, indexes them with
``ernievil2.search``, queries every caption (top 5) and prints the share of captions whose image
is in the top 5, beside the in-loop evaluator's multi-caption text→image R@5 on the same images
and model. Writes ``outputs/bench/search_recall.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", help="a demo checkpoint folder (checkpoints/step_NNNNNNN)")
    parser.add_argument("--text-max-length", type=int, default=32, help="the demo's text length (default %(default)s)")
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench" / "search_recall.json"))
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 held-out images of a 64-scene demo")
    args = parser.parse_args()

    from ernievil2.data.demo import DemoDataSpec, ensure_demo_data
    from ernievil2.evaluators.retrieval import EvalSetSpec, RetrievalEvaluator, items_to_set, read_items
    from ernievil2.search import build_index, load_encoder

    spec = DemoDataSpec(n_train=64, n_val=16, samples_per_shard=32) if args.quick else DemoDataSpec()
    demo = ensure_demo_data(Path("~/.cache/ernievil2/demo").expanduser(), spec)
    items = read_items(EvalSetSpec(name="demo_val", format="shards", path=str(demo.val_dir)))
    encoder = load_encoder(args.ckpt, device="cpu", text_max_length=args.text_max_length)
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "val"
        photos.mkdir()
        for item in items:
            (photos / f"{item.key}.jpg").write_bytes(item.load_image())
        index = build_index(photos, Path(tmp) / "val.index", encoder, batch_size=100, progress=False).index
    row = {p: i for i, p in enumerate(index.paths)}
    captions = [c for item in items for c in item.captions]
    target = [row[f"{item.key}.jpg"] for item in items for _ in item.captions]
    hits = index.search(encoder.encode_texts(captions), k=5)
    share = 100.0 * float(np.mean([t in {h.index for h in hs} for t, hs in zip(target, hits)]))
    data = items_to_set(items, encoder.image_size, encoder.tokenizer, args.text_max_length)
    record = RetrievalEvaluator("demo_val", data, "multi")(encoder.model, 0)[0]
    result = {"ckpt": str(args.ckpt), "images": len(items), "captions": len(captions),
              "search_top5_share": share, "evaluator_t2i_r5": record["t2i_r5"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"| images | captions | search: right image in top 5 | evaluator t2i R@5 |\n|---:|---:|---:|---:|\n"
          f"| {len(items)} | {len(captions)} | {share:.2f} % | {record['t2i_r5']:.2f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
