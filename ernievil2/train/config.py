"""Typed schemas behind the Hydra config groups: a misspelled or unknown key stops the run at start.

Each group of ``conf/`` (``model``, ``data``, ``loss``, ``optim``, ``eval``, ``logger``, ``trainer``)
fills one dataclass below; ``experiment`` files override any of them. The schemas are registered with
Hydra's ConfigStore as ``schema`` and form the first entry of ``conf/config.yaml``'s defaults.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from ernievil2.data.demo import DemoDataSpec, demo_path
from ernievil2.data.loader import StreamSource
from ernievil2.data.views import ViewConfig
from ernievil2.losses import LossConfig
from ernievil2.models.schema import ModelSchema, check_keys


@dataclass
class DemoSchema(DemoDataSpec):
    """The embedded procedural dataset (generated on first use, cached in ``cache_dir``)."""

    cache_dir: str = "~/.cache/ernievil2/demo"


@dataclass
class SourceSchema:
    """One training source of ``data.sources``: shards (dir, brace pattern, glob, ``http(s)://`` or
    ``pipe:`` URL), its probability weight in the mix, whether its shards are resampled
    (``None``: ``data.resampled``) and its sample count for shards without a ``sizes.json`` or
    ``_stats.json`` (``num_samples``, see ``data.num_samples``)."""

    name: str = MISSING
    shards: str = MISSING
    weight: float = 1.0
    resampled: Optional[bool] = None
    num_samples: Optional[int] = None


@dataclass
class DataSchema:
    """Training stream and loader settings. ``source=demo`` uses the embedded demo data;
    ``source=shards`` reads ``train_shards`` (one source) or ``sources`` (a weighted mix)."""

    source: str = "demo"  # "demo" or "shards"
    train_shards: Optional[str] = None  # one source: dir, brace pattern, glob, http(s):// or pipe: URL
    # Samples in train_shards (like open_clip's --train-num-samples), for the shards that neither a
    # sizes.json nor img2dataset's NNNNN_stats.json counts: spread evenly over them instead of a
    # counting pass (ernievil2.data.epoch_sizes). With data.sources: each source's num_samples.
    num_samples: Optional[int] = None
    sources: list[SourceSchema] = field(default_factory=list)  # several sources, mixed by weight
    batch_size: int = 128
    num_workers: int = 1
    shuffle_buffer: int = 1000  # samples shuffled in a buffer per loader worker
    # Draw training shards with replacement, per rank and loader worker (an endless stream that
    # max_steps ends): for fewer shards than ranks x workers, or LAION-style training. False: each
    # epoch reads every shard once across the job, and too few shards is an error. The default of
    # every source.
    resampled: bool = False
    demo: DemoSchema = field(default_factory=DemoSchema)
    # image_size of the views always follows the model's vision.image_size.
    views: ViewConfig = field(default_factory=ViewConfig)
    # Train on the captions of these languages only (codes; "zh" also keeps "zh-cn"), by each
    # caption's language (a demo sample's meta["languages"], else the sample's one language); a
    # sample left without a caption is skipped and counted (bad/other_language). Empty: all.
    caption_languages: list[str] = field(default_factory=list)

    def stream_sources(self, demo_shards: Optional[list[str]] = None) -> list[StreamSource]:
        """The training sources this config names (``demo_shards``: the demo's, for ``source=demo``)."""
        if self.source == "demo":
            if self.train_shards or self.sources or self.num_samples is not None:
                raise ValueError("data.train_shards / data.sources / data.num_samples need data.source=shards")
            if not demo_shards:
                raise ValueError("data.source=demo needs the demo shards")
            return [StreamSource.of("demo", demo_shards, 1.0, self.resampled)]
        if self.source != "shards":
            raise ValueError(f"data.source must be 'demo' or 'shards', got {self.source!r}")
        if bool(self.train_shards) == bool(self.sources):
            raise ValueError("data.source=shards needs exactly one of data.train_shards (one source) and "
                             "data.sources (a list of {name, shards, weight, resampled})")
        if self.train_shards:
            return [StreamSource.of("train", self.train_shards, 1.0, self.resampled, self.num_samples)]
        if self.num_samples is not None:
            raise ValueError("data.num_samples goes with data.train_shards; with data.sources set each source's "
                             "num_samples")
        return [StreamSource.of(s.name, s.shards, s.weight, self.resampled if s.resampled is None else s.resampled,
                                s.num_samples)
                for s in self.sources]


@dataclass
class OptimSchema:
    """AdamW (no decay on norms, biases, embeddings, temperature), cosine schedule with warm-up."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    # learning-rate factor of the temperature (logit scale) alone; < 1 slows it, as a stabiliser
    temperature_lr_scale: float = 1.0
    # Layer-wise LR decay: a tower's parameter at depth d (embeddings 0, block i i+1, final norm /
    # pooler L+1) trains at lr * decay^(L+1-d); 1.0: off. vision_/text_layer_decay: that tower's own
    # (None: layer_decay). See ernievil2.train.optim.layer_depth.
    layer_decay: float = 1.0
    vision_layer_decay: Optional[float] = None
    text_layer_decay: Optional[float] = None
    # Fraction of the run (of trainer.time_budget_s when set, else of trainer.max_steps) at which
    # the towers locked by model.<tower>.locked start training (Chinese-CLIP's stage 2), their LR
    # ramped from 0 over unlock_warmup_steps steps. None: they stay locked (LiT).
    unlock_at: Optional[float] = None
    unlock_warmup_steps: int = 0


@dataclass
class EvalSetSchema:
    """One retrieval evaluation set, read by the reader its ``format`` names (ernievil2.evaluators.retrieval)."""

    name: str = MISSING
    # shards | seed_tsv | chinese_clip | coco | karpathy | jsonl | wds_retrieval (ernievil2.data.formats)
    format: str = "shards"
    # shards: dir/pattern; seed_tsv: .tsv; chinese_clip: imgs.tsv or its folder; coco: captions json;
    # karpathy: dataset_*.json; jsonl: .jsonl; wds_retrieval: a clip_benchmark dataset folder
    path: Optional[str] = None
    image_root: Optional[str] = None  # coco / karpathy / jsonl image folder (default: the file's folder)
    # karpathy: the split to evaluate; chinese_clip: the split of a folder path; wds_retrieval: the split folder
    split: str = "test"
    caption_key: str = "captions"  # jsonl: the key of each line's caption list
    protocol: str = "multi"  # "multi" (multi-caption), "official" (1:1, first caption per image) or "both"
    # "both" (image→text and text→image) or "t2i" (text→image only, mean_recall over it: MUGE's protocol)
    directions: str = "both"
    max_images: Optional[int] = None  # keep only the first N images (file order)
    recall_k: list[int] = field(default_factory=lambda: [1, 5, 10])  # R@1/5/10 always, plus any other K here
    skip_bad_samples: bool = False  # count, log and skip malformed samples / undecodable images (else: an error)
    language: str = "en"  # the captions' language (recorded in mode=eval's clip_benchmark result JSON)
    # Keep only the captions in these languages (e.g. [zh]: the demo val set's Chinese captions), by
    # each caption's language as the reader gives it; an image left with none is left out. Empty: all.
    caption_languages: list[str] = field(default_factory=list)


@dataclass
class ClassificationSetSchema:
    """One zero-shot classification set (ernievil2.evaluators.zeroshot): images with class labels, class names
    put into prompt templates."""

    name: str = MISSING
    format: str = "shards"  # imagefolder (path/CLASS/image) | shards (KEY.cls or label_key in KEY.json)
    # imagefolder: the root folder; shards: dir/pattern, or a clip_benchmark dataset (its test/ split) or split folder
    path: Optional[str] = None
    classnames: Optional[str] = None  # one name per line (label order) or JSON; imagefolder default: folder names
    # built-in en | zh, or a file: one template per line holding {} or {c}, or JSON
    templates: str = "en"
    label_key: str = "label"  # shards: the label's key in KEY.json (KEY.cls wins when present)
    language: str = "en"  # the language of the class names and templates
    max_images: Optional[int] = None  # keep only the first N images
    skip_bad_samples: bool = False  # count, log and skip malformed samples / undecodable images (else: an error)


@dataclass
class EvalSchema:
    """When to evaluate and on which sets; every rank embeds its share of each set."""

    every_n_steps: int = 0  # 0: only at the end
    every_n_seconds: float = 0.0  # also every N training seconds (0: off); points of runs of different speeds align
    at_end: bool = True
    batch_size: int = 256  # images / texts per forward pass on each rank
    datasets: list[EvalSetSchema] = field(default_factory=list)  # retrieval sets
    classification: list[ClassificationSetSchema] = field(default_factory=list)  # zero-shot classification sets
    profile: str = "official"  # image preprocessing of every set (ernievil2.data.preprocess): official | paddlenlp
    # MiB of decoded images (uint8 crops) a rank may hold per set: a set whose largest rank share fits
    # is decoded once and re-embedded at every evaluation; a larger one (and any, at 0) is streamed:
    # decoded batch by batch at every evaluation, only its embeddings kept (same numbers either way)
    hold_images_mb: int = 512


@dataclass
class LoggerSchema:
    """``console`` (always) plus an optional backend: ``none`` or ``wandb``."""

    backend: str = "none"
    log_every: int = 20
    project: str = "ernievil2"
    entity: Optional[str] = None
    name: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    mode: Optional[str] = None  # online / offline / disabled; None: WANDB_MODE, else offline without an API key

    def __post_init__(self) -> None:
        if self.backend not in ("none", "wandb"):
            raise ValueError(f"logger.backend must be 'none' or 'wandb', got {self.backend!r}")
        if self.mode not in (None, "online", "offline", "disabled"):
            raise ValueError(f"logger.mode must be online, offline, disabled or null, got {self.mode!r}")
        if self.log_every < 1:
            raise ValueError(f"logger.log_every must be >= 1, got {self.log_every}")


@dataclass
class TrainerSchema:
    """How the loop runs. The ``trainer`` group (``conf/trainer/``: ``cpu``, the default, with these
    defaults; ``gpu_bf16``; ``gpu_bf16_sharded``) sets the precision, memory and checkpoint fields;
    experiments set the length and what to keep."""

    max_steps: int = 600
    seed: int = 0
    device: str = "auto"  # auto, cpu, gpu
    # Training-time budget in seconds (evaluation, checkpoints and start-up excluded): the run stops
    # when it is spent (max_steps stays a cap) and the LR schedule runs on its elapsed fraction.
    # Several ranks follow rank 0's clock.
    time_budget_s: Optional[float] = None
    save_checkpoint: bool = True
    # Gradient accumulation: one optimizer step per accum_steps loader batches, the loss over all
    # of them (features of the other micro-batches cached; see ernievil2.train.trainer).
    accum_steps: int = 1
    checkpoint_every: int = 0  # also save every N steps (0: only at the end)
    keep_last: int = 3  # step checkpoints kept (plus the best one)
    best_metric: Optional[str] = None  # e.g. "demo_val/multi/mean_recall": keep the best checkpoint by it
    best_mode: str = "max"  # max or min
    nan_patience: int = 5  # stop after this many non-finite losses in a row (each skips its update)
    # Precision and memory (GPU): amp none|bf16|fp16 (CPU always trains in fp32), level O1|O2;
    # recompute each transformer block in backward; shard optimizer state (1) and gradients (2).
    amp: str = "none"
    amp_level: str = "O1"
    recompute: bool = False
    sharding_stage: int = 0


@dataclass
class Config:
    model: ModelSchema = field(default_factory=ModelSchema)
    data: DataSchema = field(default_factory=DataSchema)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimSchema = field(default_factory=OptimSchema)
    eval: EvalSchema = field(default_factory=EvalSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)
    trainer: TrainerSchema = field(default_factory=TrainerSchema)
    name: str = "demo"  # run name (output folder, wandb run name default)
    mode: str = "train"  # train, or eval: evaluate ``ckpt`` with every configured evaluator, no training
    ckpt: Optional[str] = None  # mode=eval: our checkpoint/run dir, a .safetensors file, .pdparams or PaddleNLP dir
    resume: Optional[str] = None  # "latest" (this run dir's newest checkpoint) or a checkpoint/run dir


RUN_TIME_ENV = "ERNIEVIL2_RUN_TIME"
"""Environment variable holding the run's start time (ISO format, no zone) for ``${run_time:...}``."""


def run_time(pattern: str) -> str:
    """The ``${run_time:PATTERN}`` resolver of ``conf/config.yaml``'s ``hydra.run.dir``: the time in
    ``$ERNIEVIL2_RUN_TIME`` (set by ``launch/train.py`` to rank 0's clock when the paddle launcher
    starts several ranks, so that all ranks share one run dir), else now, formatted with ``strftime``."""
    stamp = os.environ.get(RUN_TIME_ENV)
    return (datetime.fromisoformat(stamp) if stamp else datetime.now()).strftime(pattern)


def demo_data(part: str, _root_: DictConfig) -> str:
    """The ``${demo_data:PART}`` resolver: the folder of one part (``train``, ``val``, ``objects``)
    of the demo dataset that ``data.demo`` describes (:func:`ernievil2.data.demo.demo_path`), for
    evaluation sets such as ``conf/eval/demo.yaml``'s. Resolving generates nothing."""
    demo = _root_.data.demo
    spec = DemoDataSpec(**{name: demo[name] for name in DemoDataSpec.__dataclass_fields__})
    return demo_path(demo.cache_dir, spec, part)


def register_schemas() -> None:
    """Register :class:`Config` as ``schema`` (used by ``conf/config.yaml``'s defaults) and the
    ``run_time`` and ``demo_data`` resolvers."""
    ConfigStore.instance().store(name="schema", node=Config)
    OmegaConf.register_new_resolver("run_time", run_time, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("demo_data", demo_data, replace=True)


def validate(cfg: DictConfig) -> Config:
    """Check ``cfg`` against :class:`Config` and return it typed. Catches what Hydra lets through,
    e.g. a misspelled key appended with ``+optim.lrr=0.1``; the error names the key."""
    check_keys(cfg, "")
    return OmegaConf.to_object(cfg)
