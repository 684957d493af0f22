"""Worker of tests/test_evaluation.py: sharded evaluation with real processes.

    python -m paddle.distributed.launch --nproc_per_node 2 tests/dist_eval_worker.py WORK_DIR

``WORK_DIR`` holds ``model.pdparams`` (a tiny model's weights), ``vocab.txt`` and ``sets.json`` (a
list of ``EvalSetSchema`` fields), written by the test. Every rank builds the evaluators with
:func:`ernievil2.evaluators.build_evaluators`, runs them (each rank embeds its slice, the slices are
gathered) and writes its records to ``WORK_DIR/records_rank{R}.json``, and those of the same sets
streamed (``eval.hold_images_mb=0``: decoded batch by batch at every evaluation) to
``WORK_DIR/records_stream_rank{R}.json``. The test runs :func:`evaluate_sets` in its own single
process and compares.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import paddle
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ernievil2.distributed import DistInfo, init_distributed
from ernievil2.evaluators import EvalContext, build_evaluators
from ernievil2.evaluators.retrieval import EvalDataError, eval_set_spec, load_eval_set
from ernievil2.models import build_model, model_config
from ernievil2.tokenizer import WordPieceTokenizer
from ernievil2.train.config import EvalSchema, EvalSetSchema

IMAGE_SIZE = 32
MAX_LEN = 12
BATCH_SIZE = 3  # several batches per rank, and a last one that is not full
STEP = 7


def tiny_model(vocab_size: int):
    """A small model of the ``tiny`` preset (fast on CPU)."""
    cfg = model_config("tiny", vision={"image_size": IMAGE_SIZE, "layers": 1},
                       text={"layers": 1, "vocab_size": vocab_size, "max_positions": MAX_LEN})
    return build_model(cfg)


def evaluate_sets(work: Path, info: DistInfo, hold_images_mb: int = 512) -> list[dict]:
    """Every record of the evaluation sets in ``work/sets.json`` for the model in ``work``."""
    tokenizer = WordPieceTokenizer(work / "vocab.txt", max_length=MAX_LEN)
    model = tiny_model(tokenizer.vocab_size)
    model.set_state_dict(paddle.load(str(work / "model.pdparams")))
    sets = [EvalSetSchema(**entry) for entry in json.loads((work / "sets.json").read_text(encoding="utf-8"))]
    eval_cfg = OmegaConf.structured(EvalSchema(batch_size=BATCH_SIZE, datasets=sets, hold_images_mb=hold_images_mb))
    evaluators = build_evaluators(eval_cfg, EvalContext(IMAGE_SIZE, tokenizer, MAX_LEN, info))
    return [record for evaluator in evaluators for record in evaluator(model, STEP)]


def held_images(work: Path, info: DistInfo) -> list[list[int]]:
    """``[image_start, images held, n_images]`` of each set in ``work/sets.json`` as this rank prepares it."""
    tokenizer = WordPieceTokenizer(work / "vocab.txt", max_length=MAX_LEN)
    out = []
    for entry in json.loads((work / "sets.json").read_text(encoding="utf-8")):
        data = load_eval_set(eval_set_spec(EvalSetSchema(**entry)), IMAGE_SIZE, tokenizer, MAX_LEN, info=info)
        out.append([data.image_start, len(data.images), data.n_images])
    return out


def bad_set_error(work: Path, info: DistInfo) -> str:
    """The error this rank raises preparing ``work/bad_set.json`` (a set with an undecodable image)."""
    tokenizer = WordPieceTokenizer(work / "vocab.txt", max_length=MAX_LEN)
    entry = json.loads((work / "bad_set.json").read_text(encoding="utf-8"))
    try:
        load_eval_set(eval_set_spec(EvalSetSchema(**entry)), IMAGE_SIZE, tokenizer, MAX_LEN, info=info)
    except EvalDataError as exc:
        return str(exc)
    return "no error"


def main() -> None:
    work = Path(sys.argv[1])
    paddle.set_device("cpu")
    info = init_distributed()
    records = evaluate_sets(work, info)
    (work / f"records_rank{info.rank}.json").write_text(json.dumps(records), encoding="utf-8")
    streamed = evaluate_sets(work, info, hold_images_mb=0)
    (work / f"records_stream_rank{info.rank}.json").write_text(json.dumps(streamed), encoding="utf-8")
    (work / f"held_rank{info.rank}.json").write_text(json.dumps(held_images(work, info)), encoding="utf-8")
    if (work / "bad_set.json").exists():
        (work / f"bad_rank{info.rank}.txt").write_text(bad_set_error(work, info), encoding="utf-8")


if __name__ == "__main__":
    main()
