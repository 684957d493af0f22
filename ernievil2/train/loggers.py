"""Where a run's numbers go: console lines, JSONL files in the run dir, and optionally wandb.

``metrics.jsonl`` holds one JSON object per evaluation record; ``train_log.jsonl`` one per logged
training step. Both are appended and flushed line by line, so a killed run keeps what it wrote.

With ``backend=wandb`` the same numbers go to a wandb run: training scalars as ``train/<name>``,
evaluation metrics as ``eval/<dataset>/<protocol>/<metric>`` plus one table per dataset and
protocol (a row per evaluation), all plotted against the optimizer step (``optimizer_step``).
The run id is kept in ``<run_dir>/wandb_run_id.txt`` so that a restart in the same run dir, or a
resume from a checkpoint that stored :attr:`RunLogger.run_id`, continues the same wandb run.
"""
from __future__ import annotations

import json
import logging
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ernievil2.evaluators.zeroshot import format_record as format_zeroshot
from ernievil2.retrieval import format_table
from ernievil2.train.config import LoggerSchema

log = logging.getLogger("ernievil2")

RUN_ID_FILE = "wandb_run_id.txt"
STEP_METRIC = "optimizer_step"
_DEFAULT_WANDB_HOST = "https://api.wandb.ai"


class _Jsonl:
    def __init__(self, path: Path):
        self.path = path

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def wandb_credentials_configured() -> bool:
    """True when wandb would find an API key: ``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``, or a
    netrc entry (``NETRC`` or ``~/.netrc``) for the wandb host (``WANDB_BASE_URL``)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        entries = netrc.netrc(str(path))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or _DEFAULT_WANDB_HOST).netloc
    return entries.authenticators(host) is not None


def resolve_wandb_mode(configured: str | None) -> str | None:
    """The wandb mode to use: ``logger.mode`` if set, else ``WANDB_MODE``, else ``offline`` (with a
    one-line notice) when no credentials are configured; ``None`` lets wandb go online."""
    if configured:
        return configured
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if wandb_credentials_configured():
        return None
    log.warning("wandb: no API key configured (WANDB_API_KEY or netrc): logging offline; "
                "upload later with `wandb sync`")
    return "offline"


class RunLogger:
    """Console + JSONL always; ``backend=wandb`` adds a wandb run (offline without an API key).

    ``resume_id`` continues that wandb run; without it the id saved in ``<run_dir>/wandb_run_id.txt``
    (if any) is reused. ``write_files=False`` (ranks other than 0 of a multi-process run): console
    lines only, no JSONL file and no wandb run, so that one job writes one set of logs.
    """

    def __init__(self, run_dir: str | os.PathLike, cfg: LoggerSchema, resolved_config: dict | None = None,
                 write_files: bool = True, resume_id: str | None = None):
        self.run_dir = Path(run_dir)
        self.metrics: _Jsonl | None = None
        self.train_log: _Jsonl | None = None
        self.wandb = None
        self._tables: dict[tuple[str, str], Any] = {}
        if not write_files:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = _Jsonl(self.run_dir / "metrics.jsonl")
        self.train_log = _Jsonl(self.run_dir / "train_log.jsonl")
        if cfg.backend == "wandb":
            self.wandb = _start_wandb(cfg, self.run_dir, resolved_config or {}, resume_id or self._saved_run_id())
            if self.run_id is not None:
                (self.run_dir / RUN_ID_FILE).write_text(self.run_id + "\n", encoding="utf-8")

    @property
    def run_id(self) -> str | None:
        """The wandb run id (store it with a checkpoint to resume the run), or None without wandb."""
        if self.wandb is None or getattr(self.wandb, "disabled", False):
            return None
        return self.wandb.id

    def _saved_run_id(self) -> str | None:
        path = self.run_dir / RUN_ID_FILE
        if not path.is_file():
            return None
        run_id = path.read_text(encoding="utf-8").strip()
        return run_id or None

    def log_train(self, step: int, scalars: dict[str, float]) -> None:
        """One training record: ``train_log.jsonl``, a console line and ``train/<name>`` in wandb."""
        record = {"step": step, **scalars}
        if self.train_log is not None:
            self.train_log.append(record)
        parts = [f"step {step}"]
        for k, v in scalars.items():
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        log.info(" | ".join(parts))
        if self.wandb is not None:
            self.wandb.log({STEP_METRIC: step, **{f"train/{k}": v for k, v in scalars.items()}})

    def log_eval(self, records: list[dict]) -> None:
        """Evaluation records (``step``, ``dataset``, ``protocol`` and metrics): ``metrics.jsonl``,
        a console table, and in wandb the scalars plus the dataset/protocol table with a new row."""
        for r in records:
            if self.metrics is not None:
                self.metrics.append(r)
            if r["protocol"] == "zeroshot":
                log.info(format_zeroshot(r))
            else:
                log.info("\n" + format_table(r, f"eval {r['dataset']} ({r['protocol']} protocol) at step {r['step']}"))
            if self.wandb is not None:
                self._log_eval_to_wandb(r)

    def _log_eval_to_wandb(self, record: dict) -> None:
        import wandb

        prefix = f"eval/{record['dataset']}/{record['protocol']}"
        metrics = {k: v for k, v in record.items() if k != "step" and _is_number(v)}
        key = (record["dataset"], record["protocol"])
        if key not in self._tables:
            self._tables[key] = wandb.Table(columns=["step", *metrics], log_mode="MUTABLE")
        table = self._tables[key]
        table.add_data(record["step"], *(metrics.get(c) for c in table.columns[1:]))
        self.wandb.log({STEP_METRIC: record["step"], f"{prefix}/table": table,
                        **{f"{prefix}/{k}": v for k, v in metrics.items()}})

    def close(self) -> None:
        """Finish the wandb run. wandb's service may still be writing the offline run file when this
        returns; it is complete at process exit or after ``wandb.teardown()``."""
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _start_wandb(cfg: LoggerSchema, run_dir: Path, config: dict[str, Any], run_id: str | None):
    import wandb

    run = wandb.init(
        project=cfg.project, entity=cfg.entity, name=cfg.name, group=cfg.group, tags=list(cfg.tags),
        mode=resolve_wandb_mode(cfg.mode), dir=str(run_dir), id=run_id, resume="allow" if run_id else None,
    )
    # A resumed run may already hold a config from before: the current one replaces it.
    run.config.update(config, allow_val_change=True)
    run.define_metric(STEP_METRIC)
    run.define_metric("train/*", step_metric=STEP_METRIC)
    run.define_metric("eval/*", step_metric=STEP_METRIC)
    return run
