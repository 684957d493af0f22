"""Clocks of a training run: training seconds that pause for evaluation and checkpoints
(:class:`TrainClock`), throughput between log lines (:class:`ThroughputMeter`) and when to
evaluate (:class:`EvalSchedule`, by steps and by training seconds)."""
from __future__ import annotations

import contextlib
import math
import time
from typing import Iterator, Optional


class TrainClock:
    """Training seconds: wall time inside the loop, minus the time :meth:`paused` (evaluation,
    checkpoints). Starts at ``elapsed`` (a resumed run's)."""

    def __init__(self, elapsed: float = 0.0):
        self.elapsed = float(elapsed)
        self._since: Optional[float] = None

    def start(self) -> None:
        self._since = time.perf_counter()

    def seconds(self) -> float:
        running = 0.0 if self._since is None else time.perf_counter() - self._since
        return self.elapsed + running

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.elapsed, self._since = self.seconds(), None
        try:
            yield
        finally:
            self.start()


class ThroughputMeter:
    """Samples/s, data-wait seconds and the share of samples with object tags over the steps since
    the last :meth:`scalars` (the job's samples: every rank steps through batches of one size)."""

    def __init__(self, world_size: int = 1):
        self.world_size = world_size
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.since, self.samples, self.wait_s, self.tagged = now, 0, 0.0, 0.0

    def waited(self, seconds: float) -> None:
        self.wait_s += seconds

    def stepped(self, rows: int, tagged: float) -> None:
        self.samples += rows * self.world_size
        self.tagged += tagged

    def scalars(self) -> dict[str, float]:
        """``samples_per_s``, ``data_wait_s``, ``objects_frac`` of the window, then a new window."""
        now = time.perf_counter()
        out = {"samples_per_s": self.samples / (now - self.since), "data_wait_s": self.wait_s,
               "objects_frac": self.tagged * self.world_size / max(1, self.samples)}
        self._reset(now)
        return out


class EvalSchedule:
    """When to evaluate mid-run: every ``every_steps`` optimizer steps (0: off) and every
    ``every_s`` training seconds (0: off; the next time is set after each evaluation)."""

    def __init__(self, every_steps: int, every_s: float, now_s: float = 0.0):
        self.every_steps, self.every_s = int(every_steps), float(every_s)
        self.next_s = self._after(now_s)

    def _after(self, now_s: float) -> Optional[float]:
        if not self.every_s:
            return None
        return (math.floor(now_s / self.every_s + 1e-9) + 1) * self.every_s

    def due(self, step: int, seconds: Optional[float]) -> bool:
        by_steps = bool(self.every_steps) and step % self.every_steps == 0
        return by_steps or (self.next_s is not None and seconds is not None and seconds >= self.next_s)

    def evaluated(self, seconds: Optional[float]) -> None:
        if seconds is not None:
            self.next_s = self._after(seconds)
