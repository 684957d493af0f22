"""Where a run's numbers go: console lines, JSONL files in the run dir, and optionally wandb.

``metrics.jsonl`` holds one JSON object per evaluation record; ``train_log.jsonl`` one per logged
training step. Both are appended and flushed line by line, so a killed run keeps what it wrote.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

from ernievil2.retrieval import format_table
from ernievil2.train.config import LoggerSchema

log = logging.getLogger("ernievil2")


class _Jsonl:
    def __init__(self, path: Path):
        self.path = path

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


class RunLogger:
    """Console + JSONL always; ``backend=wandb`` adds a wandb run (offline without an API key).

    ``write_files=False`` (ranks other than 0 of a multi-process run): console lines only, no
    JSONL file and no wandb run, so that one job writes one set of logs.
    """

    def __init__(self, run_dir: str | os.PathLike, cfg: LoggerSchema, resolved_config: Optional[dict] = None,
                 write_files: bool = True):
        if cfg.backend not in ("none", "wandb"):
            raise ValueError(f"logger.backend must be 'none' or 'wandb', got {cfg.backend!r}")
        self.run_dir = Path(run_dir)
        self.metrics: Optional[_Jsonl] = None
        self.train_log: Optional[_Jsonl] = None
        self.wandb = None
        if not write_files:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = _Jsonl(self.run_dir / "metrics.jsonl")
        self.train_log = _Jsonl(self.run_dir / "train_log.jsonl")
        if cfg.backend == "wandb":
            self.wandb = _start_wandb(cfg, self.run_dir, resolved_config or {})

    def log_train(self, step: int, scalars: dict[str, float]) -> None:
        record = {"step": step, **scalars}
        if self.train_log is not None:
            self.train_log.append(record)
        parts = [f"step {step}"]
        for k, v in scalars.items():
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        log.info(" | ".join(parts))
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)

    def log_eval(self, records: list[dict]) -> None:
        for r in records:
            if self.metrics is not None:
                self.metrics.append(r)
            log.info("\n" + format_table(r, f"eval {r['dataset']} ({r['protocol']} protocol) at step {r['step']}"))
            if self.wandb is not None:
                prefix = f"eval/{r['dataset']}/{r['protocol']}"
                self.wandb.log({f"{prefix}/{k}": v for k, v in r.items() if isinstance(v, float)}, step=r["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(cfg: LoggerSchema, run_dir: Path, config: dict[str, Any]):
    import wandb

    mode = cfg.mode or os.environ.get("WANDB_MODE")
    if mode is None and not os.environ.get("WANDB_API_KEY"):
        mode = "offline"
        log.info("wandb: no WANDB_API_KEY configured, logging offline to %s", run_dir / "wandb")
    return wandb.init(
        project=cfg.project, entity=cfg.entity, name=cfg.name, group=cfg.group, tags=list(cfg.tags),
        mode=mode, dir=str(run_dir), config=config,
    )
