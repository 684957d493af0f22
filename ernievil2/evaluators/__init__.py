"""Evaluators: small units with one interface, ``evaluator(model, step) -> list[record]``.

Each kind registers the builder of the ``eval`` config list it reads (:func:`base.register`):
``eval.datasets`` -> :class:`~ernievil2.evaluators.retrieval.RetrievalEvaluator` (image↔text
retrieval), ``eval.classification`` -> :class:`~ernievil2.evaluators.zeroshot.ZeroShotEvaluator`.
The trainer and eval-only mode call :func:`build_evaluators` and then every evaluator on every rank.
A set's images are held as crops between evaluations or streamed at each one, by
``eval.hold_images_mb`` (:mod:`ernievil2.evaluators.base`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ernievil2.data import preprocess
from ernievil2.evaluators import retrieval, zeroshot  # noqa: F401  (register their builders)
from ernievil2.evaluators.base import BUILDERS, EvalContext, EvalDataError, Evaluator

__all__ = ["BUILDERS", "EvalContext", "EvalDataError", "Evaluator", "build_evaluators"]


def build_evaluators(eval_cfg: Any, context: EvalContext) -> list[Evaluator]:
    """The evaluators of ``eval_cfg`` (``EvalSchema``): one per entry of each registered config
    list, in registration order (retrieval sets, then classification sets)."""
    profile = getattr(eval_cfg, "profile", "official")
    preprocess.check_profile(profile)
    context = dataclasses.replace(context, batch_size=eval_cfg.batch_size, profile=profile,
                                  hold_images_mb=getattr(eval_cfg, "hold_images_mb", context.hold_images_mb))
    return [build(entry, context) for key, build in BUILDERS.items() for entry in getattr(eval_cfg, key, ())]
