"""What every evaluator shares: the interface, the error for unreadable sets, and the registry
that maps an ``eval`` config list (``eval.datasets``, ``eval.classification``) to the builder of
its evaluators."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ernievil2.distributed import DistInfo


class Evaluator(Protocol):
    """``evaluator(model, step) -> list[record]``, called on every rank; every rank returns the same
    records (flat dicts with ``step``, ``dataset``, ``protocol`` and the metrics)."""

    name: str

    def __call__(self, model: Any, step: int) -> list[dict]:
        ...


class EvalDataError(ValueError):
    """An evaluation set file that cannot be read; the message names the file and line or entry."""


@dataclass(frozen=True)
class EvalContext:
    """What building any evaluator needs besides its own config entry."""

    image_size: int
    tokenizer: Any
    text_max_length: int
    info: DistInfo = DistInfo()
    batch_size: int = 256
    profile: str = "official"


Builder = Callable[[Any, EvalContext], Evaluator]
#: ``eval`` config list -> the builder of one evaluator from one of its entries, in build order.
BUILDERS: dict[str, Builder] = {}


def register(config_list: str) -> Callable[[Builder], Builder]:
    """Make the decorated function the builder of the entries of ``eval.<config_list>``."""
    def wrap(builder: Builder) -> Builder:
        if config_list in BUILDERS:
            raise ValueError(f"eval.{config_list} already has a builder: {BUILDERS[config_list].__qualname__}")
        BUILDERS[config_list] = builder
        return builder
    return wrap
