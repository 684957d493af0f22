"""Paddle DataLoader worker utilities: which worker this is (:func:`loader_worker`), logging from a
worker (:func:`log_in_worker`), killing workers with their parent (:class:`ExitWithParent`), shutting a
loader down when its caller stops early (:func:`iterate_loader`) and stacking samples into a batch
(:func:`collate_arrays`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import paddle

logger = logging.getLogger(__name__)


def loader_worker() -> tuple[int, int]:
    """(worker id, number of workers) of the current paddle DataLoader worker; (0, 1) outside workers."""
    info = paddle.io.get_worker_info()
    if info is None:
        return 0, 1
    return int(info.id), int(info.num_workers)


def log_in_worker(message: str) -> None:
    """Log an error from inside a loader worker, where paddle may lose the exception text.

    Paddle re-raises a worker's exception in a daemon thread of the main process, which may exit
    (on the generic "Blocking queue is killed" SystemError) before that thread prints it.
    """
    if paddle.io.get_worker_info() is not None:
        logger.error("loader worker %d: %s", loader_worker()[0], message)


class ExitWithParent:
    """``worker_init_fn`` for ``paddle.io.DataLoader``: a loader worker is killed when the process
    that made it (a training rank) dies.

    Without it, a worker of a rank killed by SIGKILL lives on forever (Paddle 3.3.1, seen in
    ``tests/test_multinode.py``): paddle's worker notices the dead parent and leaves its loop, then
    blocks at exit flushing its result queue into a pipe that nobody reads any more. Linux only
    (``prctl(PR_SET_PDEATHSIG, SIGKILL)``); elsewhere a no-op. Make the instance in the process
    that iterates the loader, and iterate it from that process's main thread (the kernel signals
    the worker when the thread that forked it ends).
    """

    _PR_SET_PDEATHSIG = 1

    def __init__(self) -> None:
        self.parent = os.getpid()

    def __call__(self, worker_id: int) -> None:
        if not sys.platform.startswith("linux"):
            return
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            if libc.prctl(self._PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
                logger.warning("prctl(PR_SET_PDEATHSIG) failed in loader worker %d: errno %d", worker_id,
                               ctypes.get_errno())
        except (OSError, AttributeError) as exn:
            logger.warning("loader worker %d cannot follow its parent's death: %r", worker_id, exn)
            return
        if os.getppid() != self.parent:  # the parent died before prctl took effect
            os._exit(1)


def iterate_loader(loader: Iterable[Any], join_timeout: float = 1.0) -> Iterator[Any]:
    """Iterate a ``paddle.io.DataLoader`` and shut it down completely even when the caller stops
    early (``break`` at ``max_steps``, an endless ``resampled`` stream, an exception).

    Paddle 3.3.1 shuts its reader threads down only when the loader is exhausted; left early, the
    iterator's ``__del__`` stops the workers but leaves the C++ reader and the Python thread that
    fills it running, and a process that exits soon after can die with "terminate called without an
    active exception" (SIGABRT; seen in ``tests/test_data_ranks.py``; Paddle PR #34501 describes it).
    Here, when the generator is closed, the iterator takes the same path as at its end: reader
    shutdown (which stops the C++ reader threads), workers stopped and joined; then the Python
    filling thread gets ``join_timeout`` seconds to leave (it may sit in a 5 s queue poll; once the
    reader is shut down it touches no C++ state, and it is a daemon). Uses paddle's private
    iterator attributes where present; a loader without them is simply iterated.
    """
    it = iter(loader)
    try:
        yield from it
    finally:
        reader = getattr(it, "_reader", None)
        if reader is not None and hasattr(reader, "shutdown") and not getattr(it, "_shutdown", False):
            reader.shutdown()
        if hasattr(it, "_try_shutdown_all"):
            it._try_shutdown_all()
        thread = getattr(it, "_thread", None)
        if thread is not None and thread.is_alive():
            thread.join(join_timeout)


def collate_arrays(batch: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack a list of ``{name: array}`` samples into ``{name: array[batch, ...]}``."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    keys = list(batch[0].keys())
    for i, item in enumerate(batch):
        if set(item.keys()) != set(keys):
            raise ValueError(f"batch item {i} has keys {sorted(item)}, expected {sorted(keys)}")
    return {k: np.stack([np.asarray(item[k]) for item in batch]) for k in keys}
