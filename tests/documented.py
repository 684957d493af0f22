"""The command lines the documentation shows, and the rules by which tests run them on this machine.

Where: README.md and docs/*.md (fenced ``bash``/``sh``/unlabelled blocks, ``\\`` continuations
joined, and inline code spans, which may wrap onto the next line) and the headers of
conf/**/*.yaml (``#   `` lines, continued by more-indented ``#     `` lines).

A command line is text whose first word, after any ``NAME=value`` environment assignments, is
``python``/``python3``, ``bash``/``sh`` or ``pip`` with arguments, or a shell script
``launch/*.sh`` / ``bench/*.sh`` with arguments; a ``&&`` list is split into its commands. Python
scripts are documented as ``python SCRIPT``, so ``launch/eval_retri.py --no-npy`` (an option of a
script) or a lone path (``launch/train_node.sh``) is a mention, not a command; so is the launcher
without the program it launches (``python -m paddle.distributed.launch``). A command in prose
ending in ``…`` takes the arguments of the documented command of the same script and sub-command.

Shrinking (:func:`canonical`, :func:`localise`, :func:`train_shrink`) keeps the command's own
arguments and only:

- fills placeholders: ``experiment=NAME`` → ``experiment=demo``; ``key=value``, ``...``,
  ``OVERRIDES`` and ``KEY=...`` are dropped (the config's own value stands); ``[opt]`` → ``opt``;
  a checkpoint's ``step_NNNNNNN`` → the stand-in checkpoint's;
- caps process counts at the machine's 2 cores (``--nproc_per_node``, ``NPROC``, ``--workers``)
  and a shard brace range at its first 2 shards;
- runs a ``-m`` multirun with the first ``trainer.seed`` only (seeds change no code path; every
  job of the full sweep is composed by tests/test_documented_commands.py);
- moves absolute ``/data``, ``/weights``, ``/path``, ``/tmp`` paths and ``~`` into the test's
  stand-in machine (tests/standins.py), and expands shell globs there;
- appends to a ``launch/train.py`` command the tiny model on the CPU, a small demo and, capped,
  the steps, the batch and the loader workers (:data:`TRAIN_FIXED`, :data:`TRAIN_CAPS`).
"""
from __future__ import annotations

import glob
import itertools
import logging
import os
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from hydra.core.global_hydra import GlobalHydra

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = {"python", "python3", "bash", "sh", "pip", "pip3"}
ENV_WORD = re.compile(r"[A-Z_][A-Z0-9_]*=\S*")
SHELL_SCRIPT = re.compile(r"(launch|bench)/[\w.-]+\.sh")
LAUNCHER = ["-m", "paddle.distributed.launch"]
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
ELLIPSIS = "…"

STANDIN_CHECKPOINT = "step_0000001"  # the stand-in run's checkpoint (trained 1 step)
MAX_PROCESSES = 2
PLACEHOLDERS = {"experiment=NAME": "experiment=demo", "key=value": None, "...": None, "OVERRIDES": None}
# launch/train.py: appended after the command's own overrides (an appended key wins) ...
TRAIN_FIXED = ("model=tiny", "trainer.device=cpu", "data.demo.n_train=64", "data.demo.n_val=16",
               "data.demo.samples_per_shard=32")
# ... and these as min(the command's own value, cap).
TRAIN_CAPS = {"trainer.max_steps": 2, "data.batch_size": 8, "data.num_workers": 1}
REROOTED = ("data", "weights", "path", "tmp")


@dataclass(frozen=True)
class Command:
    """One documented command: where it is shown and its words as the shell passes them."""

    where: str  # "README.md:84"
    words: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.words)


def _split(text: str) -> list[str] | None:
    try:
        return shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote: prose, not a command
        return None


def split_env(words: list[str] | tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """``NAME=value`` assignments in front of a command, and the command."""
    n = 0
    while n < len(words) and ENV_WORD.fullmatch(words[n]):
        n += 1
    return dict(w.split("=", 1) for w in words[:n]), list(words[n:])


def is_command(words: list[str] | None) -> bool:
    """The module docstring's rule."""
    if not words:
        return False
    _, rest = split_env(words)
    if not rest:
        return False
    program, args = rest[0], rest[1:]
    if program in PROGRAMS:
        return bool(args) and args != LAUNCHER
    return bool(SHELL_SCRIPT.fullmatch(program)) and bool(args)


def _markdown_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, text)`` of every fenced shell line and every inline code span."""
    found, prose, pending, start = [], [], [], 0
    fence = None  # inside a fence: its info string
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if text.startswith("```"):
            fence = text[3:].strip() if fence is None else None
            prose.append("")
            continue
        prose.append(line if fence is None else "")
        if fence is None or fence not in SHELL_FENCES:
            continue
        start = start if pending else n
        pending.append(text.removesuffix("\\").strip())
        if not text.endswith("\\"):
            found.append((start, " ".join(pending)))
            pending = []
    text = "\n".join(prose)
    for m in re.finditer(r"(`+)(.+?)\1", text, flags=re.S):
        if "\n\n" not in m.group(2):
            found.append((text.count("\n", 0, m.start()) + 1, " ".join(m.group(2).split())))
    return found


def _yaml_header_lines(path: Path) -> list[tuple[int, str]]:
    """``#   command`` lines of a config header, with their more-indented continuation lines."""
    found: list[tuple[int, list[str]]] = []
    current = None
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.startswith("#"):
            break
        body = line[1:]
        if body.startswith("   ") and not body.startswith("    "):
            current = [body.strip().removesuffix("\\").strip()]
            found.append((n, current))
        elif current is not None and body.startswith("    "):
            current.append(body.strip().removesuffix("\\").strip())
        else:
            current = None
    return [(n, " ".join(parts)) for n, parts in found]


def documentation_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "conf").rglob("*.yaml"))]


def _program(words: tuple[str, ...]) -> tuple[str, ...]:
    """The script a command runs and its sub-command (the word after it), e.g. ``(launch/filter.py, score)``."""
    i = next((i for i, w in enumerate(words) if w.endswith((".py", ".sh"))), len(words))
    return words[i:i + 2]


def documented_commands() -> list[Command]:
    """Every command line of the docs, in file order (a ``&&`` list gives one per command). A
    command written in prose that ends in ``…`` takes, in its place, the arguments of the first
    documented command of the same script and sub-command."""
    out = []
    for path in documentation_files():
        lines = _yaml_header_lines(path) if path.suffix == ".yaml" else _markdown_lines(path)
        for n, text in lines:
            words = _split(text)
            if not is_command(words):
                continue
            parts = [list(g) for is_and, g in itertools.groupby(words, lambda w: w == "&&") if not is_and]
            out += [Command(f"{path.relative_to(REPO)}:{n}", tuple(p)) for p in parts if is_command(p)]
    first: dict[tuple[str, ...], Command] = {}
    for c in out:
        if c.words[-1] != ELLIPSIS:
            first.setdefault(_program(c.words), c)
    return [_filled(c, first) for c in out]


def _filled(command: Command, first: dict[tuple[str, ...], Command]) -> Command:
    program = _program(command.words)
    if command.words[-1] != ELLIPSIS or program not in first:
        return command
    shown = first[program].words
    return Command(command.where, command.words[:-1] + shown[shown.index(program[0]) + len(program):])


# ------------------------------------------------------------------------------------ shrinking


def _cap(value: str) -> str:
    return str(min(int(value), MAX_PROCESSES)) if value.isdigit() else value


def canonical(words: tuple[str, ...], all_seeds: bool = False) -> list[str]:
    """The command with its placeholders filled and its sizes capped (the module docstring);
    ``all_seeds``: a multirun keeps every ``trainer.seed``."""
    out: list[str] = []
    multirun = not all_seeds and ("-m" in words or "--multirun" in words)
    for i, word in enumerate(words):
        word = PLACEHOLDERS.get(word, word)
        if word is None or word.endswith("=..."):  # "your overrides" / "your value": the config's own stands
            continue
        if re.fullmatch(r"\[\S+\]", word):
            word = word[1:-1]
        if i > 0 and words[i - 1] in ("--nproc_per_node", "--workers"):
            word = _cap(word)
        if word.startswith("NPROC="):
            word = "NPROC=" + _cap(word[6:])
        if multirun and word.startswith("trainer.seed=") and "," in word:
            word = word.split(",")[0]
        word = re.sub(r"checkpoints/step_\d{7}", f"checkpoints/{STANDIN_CHECKPOINT}", word)
        word = re.sub(r"\{(\d+)\.\.(\d+)\}", lambda m: f"{{{m[1]}..{int(m[1]) + 1:0{len(m[2])}d}}}", word)
        out.append(word)
    return out


def localise(words: list[str], machine: Path, cwd: Path) -> list[str]:
    """Absolute paths under the stand-in machine, ``~`` its home, shell globs expanded in ``cwd``."""
    out = []
    for word in words:
        word = re.sub(rf"(?<![\w.~/-])/(?=(?:{'|'.join(REROOTED)})/)", f"{machine}/", word)
        word = re.sub(r"(?<![\w/])~/", f"{machine}/home/", word)
        matches = sorted(glob.glob(word, root_dir=cwd)) if "*" in word else []
        out += matches or [word]
    return out


def train_overrides(words: list[str]) -> list[str] | None:
    """The Hydra overrides a command passes to launch/train.py (directly, through the paddle launcher
    or a launch/train_*.sh script); None: the command does not run it."""
    for i, word in enumerate(words):
        if word.endswith("launch/train_multinode.sh"):
            return words[words.index("--") + 1:] if "--" in words else []
        if word.endswith(("launch/train.py", "launch/train_node.sh")):
            return words[i + 1:]
    return None


def train_shrink(overrides: list[str], demo_cache: Path) -> list[str]:
    """The overrides appended to a launch/train.py command: the tiny model on the CPU, a small demo
    (in a shared cache) and, capped, the steps, the batch and the loader workers."""
    own = dict(o.split("=", 1) for o in overrides if "=" in o and not o.startswith("-"))
    caps = [f"{k}={min(int(own[k]), cap) if own.get(k, '').isdigit() else cap}" for k, cap in TRAIN_CAPS.items()]
    return [*TRAIN_FIXED, f"data.demo.cache_dir={demo_cache}", *caps]


def multirun_jobs(overrides: list[str]) -> list[list[str]]:
    """One override list per job: a ``-m`` multirun sweeps comma-separated values."""
    if "-m" not in overrides and "--multirun" not in overrides:
        return [overrides]
    args = [a for a in overrides if a not in ("-m", "--multirun")]
    swept = [a.split("=", 1)[1].split(",") if "=" in a and "," in a and "[" not in a else None for a in args]
    lists = [[f"{a.split('=', 1)[0]}={v}" for v in values] if values else [a] for a, values in zip(args, swept)]
    return [list(job) for job in itertools.product(*lists)]


# ------------------------------------------------------------------------------------ running


def exit_status(code: object) -> int:
    """``SystemExit.code`` as a process exit status."""
    return 0 if code is None else code if isinstance(code, int) else 1


def run_python(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> int:
    """``python ARGS`` in this process (``SCRIPT ...`` run as ``__main__``, or ``-m MODULE ...``) in
    ``cwd`` with ``env`` added; returns the exit status. Hydra's global state is cleared before and
    after; ``sys.argv``, the working directory, the environment and the root logger are restored."""
    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    GlobalHydra.instance().clear()
    os.environ.update(env or {})
    os.chdir(cwd)
    try:
        if args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(args)
            runpy.run_path(str((cwd / args[0]).resolve()), run_name="__main__")
        return 0
    except SystemExit as exc:
        return exit_status(exc.code)
    finally:
        GlobalHydra.instance().clear()
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
