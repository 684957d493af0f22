"""Embed an upstream evaluation file (``text \\t image_id \\t base64``) into the upstream embeddings
format (``text_emb \\t image_emb \\t 1``).

    python launch/infer.py test_file=F output_file=O vocab_file=VOCAB            # base, random init
    python launch/infer.py test_file=F output_file=O model.init_from=WEIGHTS     # released / own weights
    python launch/infer.py ... model=tiny write_npy=true skip_bad_lines=true profile=paddlenlp

Settings: conf/infer.yaml (typed by ``ernievil2.train.infer_config.InferSchema``). Writes O atomically,
plus O.ids.txt (and O.text.npy / O.image.npy with write_npy=true, O.skipped.tsv when lines were
skipped). Then: ``python launch/eval_retri.py O``.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ernievil2.threads import use_all_cpu_threads  # noqa: E402

use_all_cpu_threads()  # before Paddle is imported

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from ernievil2.inference import InferError, infer_main  # noqa: E402
from ernievil2.train.infer_config import register_infer_schema  # noqa: E402

register_infer_schema()


@hydra.main(version_base="1.3", config_path="../conf", config_name="infer")
def main(cfg: DictConfig) -> None:
    try:
        infer_main(cfg)
    except InferError as exc:
        print(f"infer.py: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
