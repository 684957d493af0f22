"""Evaluate a checkpoint the way LAION's clip_benchmark does (``clip_benchmark eval``): the same
datasets, flags, metric names and result JSON, so one line serves open_clip models and ours.

    python launch/benchmark.py eval --dataset wds/imagenet1k wds/flickr30k --dataset_root "/data/clip_benchmark/{dataset_cleaned}" --ckpt outputs/demo/RUN --output "{dataset}_{model}_{task}.json"

``--dataset``: ``wds/NAME`` (clip_benchmark's WebDataset layout under ``--dataset_root``, whose
``{dataset}`` / ``{dataset_cleaned}`` are filled in), a local folder in that layout, or
``FORMAT:PATH`` (``karpathy:``, ``coco:``, ``jsonl:``, ``shards:``, ``imagefolder:`` …). ``--task auto``
reads ``dataset_type.txt``. One JSON per dataset and language: ``{"dataset", "model", "pretrained",
"task", "metrics", "language"}``; ``clip_benchmark build *.json`` makes its CSV of them. What each
option means: ``ernievil2/benchmark.py``. Exit status: 0 done, 2 unusable dataset, checkpoint or option.
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
    """The command-line interface (clip_benchmark's ``eval`` flags, plus ``--ckpt``)."""
    p = argparse.ArgumentParser(prog="benchmark.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("eval", help="evaluate a checkpoint on clip_benchmark datasets")
    e.add_argument("--dataset", nargs="+", required=True,
                   help="wds/NAME, a clip_benchmark dataset folder, or FORMAT:PATH (one or several)")
    e.add_argument("--dataset_root", default="root",
                   help="folder of a wds/NAME dataset; {dataset} and {dataset_cleaned} are filled in (default %(default)s)")
    e.add_argument("--split", default="test", help="split folder of the dataset (default %(default)s)")
    e.add_argument("--task", default="auto", choices=("zeroshot_classification", "zeroshot_retrieval", "auto"),
                   help="auto: retrieval when dataset_type.txt says so, else classification (default %(default)s)")
    e.add_argument("--language", nargs="+", default=["en"],
                   help="language(s) of class names and templates; recorded in the JSON (default %(default)s)")
    e.add_argument("--ckpt", "--pretrained", dest="ckpt", required=True,
                   help="checkpoint of any layout: ours, a run folder, an official .pdparams or a PaddleNLP folder")
    e.add_argument("--vocab", help="WordPiece vocab.txt (default: the one in or beside --ckpt)")
    e.add_argument("--model", help="the model's name in the JSON and {model} (default: ernievil2-PRESET)")
    e.add_argument("--batch_size", type=int, default=64, help="images / texts per forward pass (default %(default)s)")
    e.add_argument("--recall_k", type=int, nargs="+", default=[1, 5, 10],
                   help="K of the retrieval recall@K metrics (default %(default)s)")
    e.add_argument("--output", help="result JSON; {dataset} {model} {pretrained} {task} {language} are filled "
                                    "in (default {dataset}_{model}_{language}_{task}.json)")
    e.add_argument("--custom_template_file", help="templates: clip_benchmark's {dataset: [templates]} JSON, a "
                                                  "JSON list or a text file, {c} or {} for the class")
    e.add_argument("--custom_classname_file", help="class names: {dataset: [names]} JSON, a JSON list or a text file")
    e.add_argument("--num_workers", type=int, default=0,
                   help="accepted for clip_benchmark's command lines; images are read in this process")
    e.add_argument("--skip_existing", action="store_true", help="skip a dataset whose result JSON exists")
    e.add_argument("--text_max_length", type=int, default=48, help="tokens per prompt or caption (default %(default)s)")
    e.add_argument("--profile", default="official", choices=("official", "paddlenlp"),
                   help="image preprocessing (ernievil2.data.preprocess; default %(default)s)")
    e.add_argument("--device", default="auto", help="auto | cpu | gpu | gpu:N (default %(default)s)")
    e.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="auto: Paddle Inference with oneDNN on CPU, dygraph on a GPU (default %(default)s)")
    e.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="bf16: oneDNN bfloat16 on CPUs that have it, about 2x faster (default %(default)s)")
    e.add_argument("--quiet", action="store_true", help="warnings and errors only")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run; return the exit status."""
    args = build_parser().parse_args(argv)
    from ernievil2.benchmark import DEFAULT_OUTPUT, BenchmarkOptions, check_outputs, resolve_sets, run_benchmark

    _log_to_stderr(args.quiet)
    opts = BenchmarkOptions(
        dataset=args.dataset, ckpt=args.ckpt, dataset_root=args.dataset_root, task=args.task, language=args.language,
        split=args.split, vocab=args.vocab, model=args.model, batch_size=args.batch_size, recall_k=args.recall_k,
        output=args.output or DEFAULT_OUTPUT, custom_template_file=args.custom_template_file,
        custom_classname_file=args.custom_classname_file, text_max_length=args.text_max_length,
        profile=args.profile, device=args.device, skip_existing=args.skip_existing, backend=args.backend,
        precision=args.precision)
    try:
        sets = resolve_sets(opts)  # before Paddle is imported: a missing folder is one line at once
        check_outputs(opts, sets)
        warnings.filterwarnings("ignore", message="No ccache found")  # paddle's import-time notice
        import paddle  # noqa: F401  (it installs an INFO root log handler: replaced below)

        _log_to_stderr(args.quiet)
        for path in run_benchmark(opts, sets):
            print(f"wrote {path}")
    except (ValueError, OSError) as exn:  # unusable dataset, checkpoint, vocab or option: one line, no traceback
        logging.getLogger("ernievil2.benchmark").debug("error", exc_info=True)
        message = "; ".join(line.strip() for line in str(exn).splitlines() if line.strip())
        print(f"benchmark.py: error: {message}", file=sys.stderr)
        return 2
    return 0


def _log_to_stderr(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s", force=True)


if __name__ == "__main__":
    sys.exit(main())
