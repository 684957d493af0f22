"""Export the image and text towers as Paddle Inference models (``paddle.jit.save``), or as ONNX too.

    python launch/export.py OUT_DIR model.init_from=WEIGHTS vocab_file=VOCAB      # base preset
    python launch/export.py OUT_DIR model=tiny seed=0                             # random init
    python launch/export.py OUT_DIR --format onnx model.init_from=WEIGHTS         # + ONNX (extra: onnx)

Any ``conf/infer.yaml`` override selects the model (``model=...``, ``model.init_from=...``,
``model.vision.layers=...``, ``text_max_length=...``, ``seed=...``). Writes
``OUT_DIR/image/inference.{json,pdiparams}`` (input ``pixels`` float32 [N, 3, S, S]),
``OUT_DIR/text/inference.{json,pdiparams}`` (input ``input_ids`` int64 [N, L]), ``export.json``
and, when a vocab is known, ``vocab.txt``. Both models output L2-normalised embeddings.
``--format onnx`` adds ``OUT_DIR/image/model.onnx`` and ``OUT_DIR/text/model.onnx`` (paddle2onnx;
same inputs, output ``embedding``; ``pip install -e ".[onnx]"``) and records them in ``export.json``;
the Paddle Inference files stay beside them. The folder is replaced atomically.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
FORMATS = ("paddle", "onnx")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="output folder (replaced atomically)")
    p.add_argument("overrides", nargs="*", help="conf/infer.yaml overrides, e.g. model.init_from=PATH")
    p.add_argument("--format", choices=FORMATS, default="paddle",
                   help="paddle: Paddle Inference models (default); onnx: those and their ONNX conversions")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset asked of paddle2onnx (--format onnx; default 17)")
    args = p.parse_intermixed_args(argv)
    if args.opset is not None and args.format != "onnx":
        p.error("--opset applies to --format onnx only")

    import paddle
    from hydra import compose, initialize_config_dir

    from ernievil2.inference import InferError, build_inference_model, export_inference
    from ernievil2.inference.onnx_export import DEFAULT_OPSET, export_onnx, import_converter
    from ernievil2.models.schema import check_keys
    from ernievil2.train.infer_config import register_infer_schema

    register_infer_schema()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("infer", overrides=list(args.overrides))
    try:
        check_keys(cfg)
        paddle.set_device("cpu")
        if args.format == "onnx":
            import_converter()  # a missing extra fails before the model is built
        model, tokenizer = build_inference_model(cfg, require_vocab=False)
        vocab = tokenizer.vocab_file if tokenizer is not None else None
        sizes = (model.cfg.vision.image_size, cfg.text_max_length, vocab)
        if args.format == "onnx":
            files = export_onnx(model, args.out_dir, *sizes, opset=args.opset or DEFAULT_OPSET)
        else:
            files = export_inference(model, args.out_dir, *sizes)
    except (InferError, KeyError) as exc:
        print(f"export.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported to {files['dir']} ({args.format})")
    for key, path in files.items():
        if key != "dir":
            print(f"  {key}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
