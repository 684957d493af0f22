"""What tests that compose configs or run ``launch/train.py`` on the demo share: composing with a
test's small overrides, the subprocess command and environment, and reading a run's JSONL logs."""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"


def compose_config(small: Sequence[str], *overrides: str):
    """The root config with ``small`` then ``overrides`` applied."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[*small, *overrides])


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL log (blank lines skipped)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_cmd(small: Sequence[str], run_dir: Path, cache: Path, *extra: str) -> list[str]:
    """``python launch/train.py`` with ``small``, the demo cache and run dir, then ``extra``."""
    return [sys.executable, str(REPO_ROOT / "launch" / "train.py"), *small, f"data.demo.cache_dir={cache}",
            f"hydra.run.dir={run_dir}", *extra]


def train_env() -> dict[str, str]:
    """This environment without the launcher's variables, with the repository importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env
