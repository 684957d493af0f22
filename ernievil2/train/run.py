"""Wire a resolved config into a training run: data, tokenizer, model, loss, optimizer, evaluators.

The same code runs as one process and under ``python -m paddle.distributed.launch`` (one process
per rank, all sharing one run dir): model init is identical on every rank (same seed before
``build_model``; ``paddle.DataParallel`` also broadcasts rank 0's parameters), dropout and other
global randomness after that is seeded with ``seed + rank``, every rank reads its own shards, and
rank 0 alone writes ``config.json``, the vocab, the JSONL logs, wandb and checkpoints and runs the
evaluations.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import paddle
from omegaconf import DictConfig, OmegaConf

from ernievil2.atomic import atomic_write
from ernievil2.benchmark import DEFAULT_RECALL_K, model_label, result_document
from ernievil2.data.caption_language import kept_captions
from ernievil2.data.demo import DemoDataSpec, demo_folder, ensure_demo_data
from ernievil2.data.device_views import ViewFinisher
from ernievil2.data.loader import build_train_data
from ernievil2.data.shard_reader import iter_samples
from ernievil2.data.views import MultiViewTransform, simclr_size
from ernievil2.distributed import (
    DistInfo,
    DistributedExchange,
    broadcast_object,
    init_distributed,
    main_process_first,
)
from ernievil2.evaluators import EvalContext, Evaluator
from ernievil2.evaluators import build_evaluators as build_configured_evaluators
from ernievil2.losses import MultiViewLoss
from ernievil2.models import build_model
from ernievil2.models.schema import resolve_model
from ernievil2.tokenizer import WordPieceTokenizer
from ernievil2.train.checkpoint_manager import CheckpointManager
from ernievil2.train.config import Config, validate
from ernievil2.train.loggers import RunLogger
from ernievil2.train.optim import build_optimizer
from ernievil2.train.towers import TowerSchedule
from ernievil2.train.trainer import Trainer
from ernievil2.train.training_checkpoint import TRAINER_STATE, read_trainer_state
from ernievil2.weights.load import load_model
from ernievil2.weights.towers import init_model

log = logging.getLogger("ernievil2")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def _training_captions(shards: list[str], limit: int = 200_000, languages: Sequence[str] = ()) -> Iterable[str]:
    """The captions a vocab is built from: of the first ``limit`` samples, those in ``languages`` (all when empty)."""
    n = 0
    for sample in iter_samples(shards):
        for i in kept_captions(sample.captions, sample.lang, sample.meta, languages):
            yield sample.captions[i]
        n += 1
        if n >= limit:
            return


def prepare_tokenizer(cfg: Config, train_shards: list[str], run_dir: Path,
                      info: Optional[DistInfo] = None) -> WordPieceTokenizer:
    """Load ``model.vocab_file``, or build a vocab from the training captions into the run dir.

    Several ranks: rank 0 builds ``<run_dir>/vocab.txt`` and sends its text to the others, which
    load it from a private temporary file (no shared file system needed; the tokenizer reads the
    file once, when it is made).
    """
    m = cfg.model
    info = info or DistInfo()
    if m.vocab_file:
        return WordPieceTokenizer(os.path.expanduser(m.vocab_file), max_length=m.text_max_length)
    text = None
    if info.is_main:
        captions = _training_captions(train_shards, languages=cfg.data.caption_languages)
        vocab = WordPieceTokenizer.build_vocab(captions, run_dir / "vocab.txt", m.vocab_size)
        text = Path(vocab).read_text(encoding="utf-8")
    text = broadcast_object(text)
    if info.is_main:
        return WordPieceTokenizer(vocab, max_length=m.text_max_length)
    with tempfile.TemporaryDirectory(prefix=f"ernievil2_rank{info.rank}_") as tmp:
        vocab = Path(tmp) / "vocab.txt"
        vocab.write_text(text, encoding="utf-8")
        return WordPieceTokenizer(vocab, max_length=m.text_max_length)


def demo_data_spec(cfg: Config) -> DemoDataSpec:
    """The demo data's spec from ``data.demo``."""
    return DemoDataSpec(**{f.name: getattr(cfg.data.demo, f.name) for f in dataclasses.fields(DemoDataSpec)})


def resolve_data(cfg: Config) -> list[str]:
    """The training shards. The demo dataset is generated on first use: when training reads it
    (``data.source=demo``) or an evaluation set lies in its folder (``conf/eval/demo.yaml``)."""
    d = cfg.data
    if d.source not in ("demo", "shards"):
        raise ValueError(f"data.source must be 'demo' or 'shards', got {d.source!r}")
    folder = demo_folder(d.demo.cache_dir, demo_data_spec(cfg))
    eval_paths = [Path(os.path.expanduser(s.path)) for s in (*cfg.eval.datasets, *cfg.eval.classification) if s.path]
    if d.source == "demo" or any(p.is_relative_to(folder) for p in eval_paths):
        demo = ensure_demo_data(d.demo.cache_dir, demo_data_spec(cfg))
        if d.source == "demo":
            return demo.train_shards
    return [shard for src in d.stream_sources() for shard in src.shards]


def build_evaluators(cfg: Config, image_size: int, tokenizer: WordPieceTokenizer, info: DistInfo) -> list[Evaluator]:
    """The configured evaluation sets as evaluators (every rank holds them and embeds its share; rank 0 logs)."""
    return build_configured_evaluators(cfg.eval, EvalContext(image_size, tokenizer, cfg.model.text_max_length, info))


def run_training(cfg: DictConfig | Config, run_dir: str | Path) -> list[dict]:
    """Train as configured; returns the final evaluation records (also in ``metrics.jsonl``)."""
    resolved = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dataclasses.asdict(cfg)
    cfg = validate(cfg) if isinstance(cfg, DictConfig) else cfg
    if cfg.trainer.device != "auto":
        paddle.set_device(cfg.trainer.device)
    info = init_distributed()
    run_dir = Path(run_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(resolved, indent=2, ensure_ascii=False), encoding="utf-8")
    if info.distributed:
        log.info("rank %d of %d (local rank %d), run dir %s", info.rank, info.world_size, info.local_rank, run_dir)
    set_seed(cfg.trainer.seed)  # the same on every rank: identical model init

    with main_process_first():  # rank 0 generates the demo data once; the others find it cached
        train_shards = resolve_data(cfg)
    tokenizer = prepare_tokenizer(cfg, train_shards, run_dir, info)
    model_cfg = resolve_model(cfg.model, tokenizer.vocab_size, built_vocab=not cfg.model.vocab_file)
    if tokenizer.vocab_size > model_cfg.text.vocab_size:
        raise ValueError(f"vocab has {tokenizer.vocab_size} tokens but model.text.vocab_size is {model_cfg.text.vocab_size}")
    model = build_model(model_cfg)
    # model.init_from, then each tower's own init_from (which wins for its tower)
    init_model(model, cfg.model.init_from, {t: getattr(cfg.model, t).init_from for t in ("vision", "text")})
    n_params = sum(int(np.prod(p.shape)) for p in model.parameters())
    log.info("model %s: %.2fM parameters, image %d px, attention %s", cfg.model.preset, n_params / 1e6,
             model_cfg.vision.image_size, model_cfg.attention)
    # From here on randomness (dropout) differs per rank. Data augmentation does not need this: it
    # is seeded per sample key, and each rank reads different samples.
    set_seed(cfg.trainer.seed + info.rank)

    loss = MultiViewLoss(cfg.loss, DistributedExchange(info))
    views_cfg = dataclasses.replace(cfg.data.views, image_size=model_cfg.vision.image_size)
    if simclr_size(views_cfg) % model_cfg.vision.patch_size:
        raise ValueError(f"data.views.aux_image_scale={views_cfg.aux_image_scale} gives {simclr_size(views_cfg)} px "
                         f"SimCLR views, not a multiple of the model's patch size {model_cfg.vision.patch_size}")
    aux_views = loss.aux_views
    transform = MultiViewTransform(views_cfg, tokenizer, cfg.model.text_max_length, cfg.trainer.seed,
                                   views=loss.required_views, aux_views=aux_views,
                                   aux_rows=loss.rows(aux_views[0], cfg.data.batch_size) if aux_views else None,
                                   caption_languages=cfg.data.caption_languages)
    finish_views = ViewFinisher(views_cfg.mean, views_cfg.std)
    # A model on the CPU leaves no time to finish the views in this process, and the loader workers
    # have plenty: they finish them there (the same computation).
    finish_in_loader = paddle.get_device() == "cpu" and cfg.data.num_workers > 0
    data = build_train_data(cfg.data.stream_sources(demo_shards=train_shards), transform,
                            batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
                            shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.trainer.seed, world_size=info.world_size,
                            finisher=finish_views if finish_in_loader else None,
                            sizes_cache=run_dir / "shard_sizes.json")

    evaluators = build_evaluators(cfg, model_cfg.vision.image_size, tokenizer, info)
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.trainer.max_steps, cfg.trainer.time_budget_s)
    towers = TowerSchedule.from_config(model, cfg.model, cfg.optim)  # locks before the trainer wraps the model
    resume_from = resolve_resume(cfg.resume, run_dir)
    logger = RunLogger(run_dir, cfg.logger, resolved, write_files=info.is_main,
                       resume_id=saved_wandb_run_id(resume_from))
    vocab_path = Path(tokenizer.vocab_file)
    trainer = Trainer(
        model, loss, optimizer, scheduler, data, evaluators, logger, run_dir, cfg.trainer,
        log_every=cfg.logger.log_every, eval_every=cfg.eval.every_n_steps,
        eval_every_s=cfg.eval.every_n_seconds, eval_at_end=cfg.eval.at_end,
        checkpoint_files={"vocab.txt": vocab_path}, config=resolved, dist=info,
        finish_views=finish_views, towers=towers,
    )
    try:
        if resume_from is not None:
            trainer.resume(str(resume_from))
        return trainer.fit()
    finally:
        logger.close()


def resolve_resume(resume: Optional[str], run_dir: Path) -> Optional[Path]:
    """The checkpoint ``resume`` names: ``latest`` = this run dir's newest (None when the run dir
    has none yet: a fresh start, so that the same command line restarts a killed job), else a
    checkpoint folder or a run dir (its latest checkpoint)."""
    if not resume:
        return None
    if resume == "latest":
        manager = CheckpointManager(run_dir / "checkpoints")
        latest = manager.latest()
        if latest is None:
            log.info("resume=latest: no checkpoint in %s yet, starting fresh", run_dir)
        return latest
    return CheckpointManager(run_dir / "checkpoints").resolve(resume)


def saved_wandb_run_id(ckpt: Optional[Path]) -> Optional[str]:
    """The wandb run id a checkpoint recorded (so that a resumed run continues the same wandb run)."""
    return read_trainer_state(ckpt)["extra"].get("wandb_run_id") if ckpt is not None else None


def run_evaluation(cfg: DictConfig | Config, run_dir: str | Path) -> list[dict]:
    """``mode=eval``: load ``ckpt`` (any supported layout), run every configured evaluator once,
    print the tables and write ``eval_results.json`` into the run dir. No optimizer is built."""
    resolved = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dataclasses.asdict(cfg)
    cfg = validate(cfg) if isinstance(cfg, DictConfig) else cfg
    if not cfg.ckpt:
        raise ValueError("mode=eval needs ckpt=PATH (a checkpoint or run dir of ours, a .safetensors file, an "
                         "official .pdparams or a PaddleNLP folder)")
    if not cfg.eval.datasets and not cfg.eval.classification:
        raise ValueError("mode=eval: no evaluation set configured (eval.datasets and eval.classification are empty; "
                         "e.g. eval=demo)")
    if cfg.trainer.device != "auto":
        paddle.set_device(cfg.trainer.device)
    info = init_distributed()
    run_dir = Path(run_dir)
    # The checkpoint's vocab by the library's one rule (model.vocab_file overrides it); a bare
    # .safetensors file records no architecture: the model group's preset describes it.
    loaded = load_model(cfg.ckpt, cfg.model.vocab_file,
                        fallback_config=lambda vocab_size: resolve_model(cfg.model, vocab_size, built_vocab=False))
    src, model = loaded.source, loaded.model
    if loaded.vocab_file is None:
        raise ValueError(f"mode=eval: no vocab.txt beside {src.weights} or in {src.path}; pass model.vocab_file=PATH "
                         "(the vocab the checkpoint was trained with)")
    tokenizer = loaded.tokenizer(cfg.model.text_max_length)
    state_file = src.weights.parent
    step = read_trainer_state(state_file)["step"] if (state_file / TRAINER_STATE).is_file() else 0
    evaluators = build_evaluators(cfg, model.cfg.vision.image_size, tokenizer, info)
    logger = RunLogger(run_dir, cfg.logger, resolved, write_files=info.is_main)
    try:
        records = [r for ev in evaluators for r in ev(model, step)]
        logger.log_eval(records)
    finally:
        logger.close()
    if info.is_main:
        out = {"checkpoint": str(src.weights), "layout": src.layout, "step": step, "records": records}
        with atomic_write(run_dir / "eval_results.json") as f:
            f.write(json.dumps(out, indent=2, ensure_ascii=False))
        log.info("evaluation results written to %s", run_dir / "eval_results.json")
        write_clip_benchmark_results(cfg, records, str(src.weights), model_label(model.cfg), run_dir / "clip_benchmark")
    return records


def write_clip_benchmark_results(cfg: Config, records: list[dict], pretrained: str, model: str, folder: Path) -> None:
    """One clip_benchmark result JSON per record of a clip_benchmark task, ``DATASET_TASK.json``
    (``/`` in a set's name becomes ``-``), as ``launch/benchmark.py eval`` writes them."""
    languages = {e.name: e.language for e in (*cfg.eval.datasets, *cfg.eval.classification)}
    recall_k = {e.name: e.recall_k for e in cfg.eval.datasets}
    for record in records:
        doc = result_document(record, model, pretrained, languages.get(record["dataset"], "en"),
                              recall_k=recall_k.get(record["dataset"], DEFAULT_RECALL_K))
        if doc is None:
            continue
        with atomic_write(folder / f"{record['dataset'].replace('/', '-')}_{doc['task']}.json") as f:
            f.write(json.dumps(doc))
