"""Shared fixtures: paths to the real data beside the repository (skipped cleanly when absent)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("ERNIEVIL2_SHARED", REPO_ROOT.parent / "shared"))


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _require(SHARED_DIR)


@pytest.fixture(scope="session")
def released_vocab() -> Path:
    return _require(SHARED_DIR / "assets" / "ernie-3.0-base-zh" / "vocab.txt")


@pytest.fixture(scope="session")
def flickr8k_dir() -> Path:
    return _require(SHARED_DIR / "data" / "flickr8k-cn-train")


@pytest.fixture(scope="session")
def coco_mini_dir() -> Path:
    return _require(SHARED_DIR / "data" / "coco-mini-train")
