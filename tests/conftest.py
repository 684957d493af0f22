"""Shared fixtures: paths to the real data beside the repository. Without them (a fresh clone has no
``../shared``) the tests that need them skip, each naming what is missing and where it was looked for."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("ERNIEVIL2_SHARED", REPO_ROOT.parent / "shared"))
# Exports for the CPU predictors (ernievil2.inference.predictor) go to a folder of this test run,
# which subprocesses inherit, not to the user's cache.
os.environ.setdefault("ERNIEVIL2_PREDICTOR_CACHE", tempfile.mkdtemp(prefix="ernievil2-predictors-"))
WHERE = "set ERNIEVIL2_SHARED to move it"


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"needs {what}: {path} not found ({WHERE})")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _require(SHARED_DIR, "the shared data folder ../shared")


@pytest.fixture(scope="session")
def released_vocab() -> Path:
    return _require(SHARED_DIR / "assets" / "ernie-3.0-base-zh" / "vocab.txt", "the released ERNIE 3.0 vocab")


@pytest.fixture(scope="session")
def flickr8k_dir() -> Path:
    return _require(SHARED_DIR / "data" / "flickr8k-cn-train", "the Flickr8k-CN training set")


@pytest.fixture(scope="session")
def coco_mini_dir() -> Path:
    return _require(SHARED_DIR / "data" / "coco-mini-train", "the COCO-mini training set")


@pytest.fixture(scope="session")
def seed_sample() -> Path:
    return _require(SHARED_DIR / "data" / "seed-format-sample.zh.tsv", "the seed-format evaluation sample")
