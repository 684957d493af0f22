"""Every ``launch/train.py`` command line shown in README.md, docs/*.md and the headers of
conf/**/*.yaml composes with Hydra and validates against the typed schema, as the shell
would pass it (quotes removed, continuation lines joined; a multirun's jobs each composed)."""
from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from ernievil2.train.config import register_schemas, validate

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("launch/train.py", "launch/train_node.sh", "launch/train_multinode.sh")
# Placeholders the docs use for "your experiment" / "your overrides": a real value in their place.
PLACEHOLDERS = {"experiment=NAME": "experiment=demo", "key=value": None, "...": None, "OVERRIDES": None}

register_schemas()


def _markdown_commands(path: Path) -> list[str]:
    """Command lines in fenced blocks and inline code spans (continuations joined)."""
    text = path.read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        out += block.replace("\\\n", " ").splitlines()
    out += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return out


def _yaml_header_commands(path: Path) -> list[str]:
    """``#   command`` lines of a config header, with their more-indented continuation lines."""
    commands, current = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        body = line[1:]
        if body.startswith("   ") and not body.startswith("    ") and any(s in body for s in SCRIPTS):
            current = [body.strip()]
            commands.append(current)
        elif current is not None and body.startswith("    "):
            current.append(body.strip())
        else:
            current = None
    return [" ".join(part.rstrip("\\").strip() for part in c) for c in commands]


def _train_overrides(line: str) -> list[str] | None:
    """The Hydra overrides a command line passes to launch/train.py (None: not such a command)."""
    if not any(s in line for s in SCRIPTS) or line.lstrip().startswith(("bash ", "cat ")):
        return None
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    for i, w in enumerate(words):
        if w.endswith(SCRIPTS):
            args = words[i + 1:]
            if w.endswith("train_multinode.sh"):
                args = args[args.index("--") + 1:] if "--" in args else []
            break
    else:
        return None
    args = [PLACEHOLDERS.get(a, a) for a in args]
    return [a for a in args if a is not None]


def documented_commands() -> list[tuple[str, str]]:
    found = []
    sources = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    for path in sources:
        found += [(path.name, line) for line in _markdown_commands(path)]
    for path in sorted((REPO / "conf").rglob("*.yaml")):
        found += [(str(path.relative_to(REPO)), line) for line in _yaml_header_commands(path)]
    return [(where, line) for where, line in found if _train_overrides(line) is not None]


def _jobs(args: list[str]) -> list[list[str]]:
    """One override list per job: a ``-m`` multirun sweeps comma-separated values."""
    if "-m" not in args and "--multirun" not in args:
        return [args]
    args = [a for a in args if a not in ("-m", "--multirun")]
    choices = [a.split("=", 1)[1].split(",") if "=" in a and "," in a and "[" not in a else None for a in args]
    lists = [[f"{a.split('=', 1)[0]}={v}" for v in c] if c else [a] for a, c in zip(args, choices)]
    return [list(job) for job in itertools.product(*lists)]


def test_documentation_shows_train_commands():
    where = {w for w, _ in documented_commands()}
    assert {"README.md", "DISTRIBUTED.md", "conf/experiment/pretrain_base.yaml", "conf/eval/imagenet.yaml"} <= where


@pytest.mark.parametrize("where,line", documented_commands())
def test_documented_train_command_composes(where, line, monkeypatch):
    monkeypatch.setenv("REAL_MIX_ROOT", "/data/packed")
    monkeypatch.setenv("ERNIEVIL2_SHARED", "/data/shared")
    monkeypatch.setenv("COCO_CN_TSV", "/data/coco-cn.tsv")
    for overrides in _jobs(_train_overrides(line)):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        with open_dict(cfg):
            del cfg["hydra"]
        validate(cfg)
