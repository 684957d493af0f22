"""The training checkpoints of a run: the ``step_NNNNNNN`` folders under one root, a ``latest``
and a ``best`` pointer (small text files naming a folder, replaced atomically) and retention.
Each folder is one training checkpoint of :mod:`ernievil2.train.training_checkpoint`."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from ernievil2.atomic import atomic_dir, atomic_write, fsync_dir
from ernievil2.train.training_checkpoint import (
    METRICS,
    TRAINER_STATE,
    is_complete_checkpoint,
    jsonable,
    read_trainer_state,
)
from ernievil2.weights.layouts import WEIGHTS

log = logging.getLogger("ernievil2")

LATEST = "latest"
BEST = "best"

_STEP_DIR = re.compile(r"^step_(\d+)$")
# What killed saves leave in the root: atomic_dir's ".step_N.XXXX" / ".step_N.old", atomic_write's
# ".latest.XXXX.tmp", and the ".trash.step_N" of an interrupted removal.
_LEFTOVER = re.compile(r"^\.(step_\d+\.|trash\.|latest\.|best\.)")


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


class CheckpointManager:
    """The ``step_NNNNNNN`` checkpoint folders of a run under ``root``, a ``latest`` and a ``best``
    pointer (small text files naming a folder) and retention: the last ``keep_last`` folders plus the
    best by ``metrics[best_metric]`` (``best_mode`` ``"max"`` or ``"min"``) are kept."""

    def __init__(self, root: str | os.PathLike, keep_last: int = 3, best_metric: str | None = None,
                 best_mode: str = "max"):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.root = Path(root)
        self.keep_last, self.best_metric, self.best_mode = keep_last, best_metric, best_mode

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step:07d}"

    def checkpoints(self) -> list[Path]:
        """The complete checkpoint folders, lowest step first."""
        if not self.root.is_dir():
            return []
        found = [d for d in self.root.iterdir() if _STEP_DIR.match(d.name) and is_complete_checkpoint(d)]
        return sorted(found, key=_step_of)

    def _pointer(self, name: str) -> Path | None:
        """The complete checkpoint folder the pointer file ``name`` names; None when there is no
        pointer or it names anything else."""
        try:
            target = (self.root / name).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        if _STEP_DIR.match(target) and is_complete_checkpoint(self.root / target):
            return self.root / target
        log.warning("%s names %r, which is not a complete checkpoint: ignored", self.root / name, target)
        return None

    def latest(self) -> Path | None:
        """The folder ``latest`` names; without a valid pointer, the complete folder of the highest step."""
        pointed = self._pointer(LATEST)
        if pointed is not None:
            return pointed
        done = self.checkpoints()
        return done[-1] if done else None

    def best(self) -> Path | None:
        """The folder ``best`` names (None before any checkpoint had the metric)."""
        return self._pointer(BEST)

    def resolve(self, resume: str | os.PathLike) -> Path:
        """``"latest"`` → :meth:`latest`; a checkpoint folder → itself; a checkpoints root or a run
        folder (holding ``checkpoints/``) → its latest checkpoint."""
        if str(resume) == LATEST:
            found = self.latest()
            if found is None:
                raise FileNotFoundError(f"resume=latest: no complete checkpoint under {self.root}")
            return found
        path = Path(resume)
        if is_complete_checkpoint(path):
            return path
        for root in (path, path / "checkpoints"):
            found = CheckpointManager(root).latest()
            if found is not None:
                return found
        read_trainer_state(path)  # raises with the reason when path is a folder of model weights only
        raise FileNotFoundError(f"resume={resume}: neither a training checkpoint (a folder with {WEIGHTS} and "
                                f"{TRAINER_STATE}) nor a run or checkpoints folder holding one")

    def _metric(self, metrics: dict | None) -> float | None:
        if self.best_metric is None or not metrics or self.best_metric not in metrics:
            return None
        value = float(metrics[self.best_metric])
        return None if math.isnan(value) else value

    def _beats_best(self, value: float | None) -> bool:
        if value is None:
            return False
        best = self.best()
        current = None
        if best is not None and (best / METRICS).is_file():
            current = self._metric(json.loads((best / METRICS).read_text(encoding="utf-8")))
        if current is None:
            return True
        return value > current if self.best_mode == "max" else value < current

    def _write_pointer(self, name: str, target: Path) -> None:
        with atomic_write(self.root / name) as f:
            f.write(target.name + "\n")

    def _remove(self, path: Path) -> None:
        # Renamed out of sight first: a kill during the removal never leaves a half-deleted step_ folder.
        trash = self.root / f".trash.{path.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
        shutil.rmtree(trash)

    def _clear_leftovers(self) -> None:
        if self.root.is_dir():
            for entry in self.root.iterdir():
                if _LEFTOVER.match(entry.name):
                    log.info("removing %s, left by an interrupted save", entry)
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    def save(self, step: int, save_fn: Callable[[Path], None], metrics: dict | None = None) -> Path:
        """Write ``step_NNNNNNN`` atomically (``save_fn`` fills a temporary folder, e.g. with
        :func:`write_training_checkpoint`; ``metrics`` go to its ``metrics.json``), then point
        ``latest`` at it (and ``best`` when its metric is the best so far), and only then remove the
        folders retention lets go. Folders of later steps (left by a run resumed from an earlier
        checkpoint) stay until this run overwrites them."""
        self._clear_leftovers()
        target = self.step_dir(step)
        value = self._metric(metrics)
        with atomic_dir(target) as tmp:
            if metrics is not None:
                (tmp / METRICS).write_text(json.dumps(jsonable(metrics, "metrics"), indent=1), encoding="utf-8")
            save_fn(tmp)
            if not is_complete_checkpoint(tmp):
                raise RuntimeError(f"save_fn left no complete checkpoint for step {step} ({WEIGHTS} and "
                                   f"{TRAINER_STATE} are needed)")
        self._write_pointer(LATEST, target)
        if self._beats_best(value):
            self._write_pointer(BEST, target)
        fsync_dir(self.root)  # the pointer renames are durable before anything is removed
        best = self.best()
        done = [d for d in self.checkpoints() if _step_of(d) <= step]
        for old in done[:-self.keep_last]:
            if old != best:
                self._remove(old)
        return target
