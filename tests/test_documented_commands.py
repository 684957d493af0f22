"""Every command line shown in README.md, docs/*.md and the headers of conf/**/*.yaml is run here.

Which text is a command, and how a command is shrunk to run in seconds, is tests/documented.py's
docstring; the stand-in data and the machine the docs assume (``outputs/demo/RUN``, ``/data/...``,
``../shared``, ``~/Pictures`` ...) are tests/standins.py's. In short: the command runs with its own
arguments, placeholders filled, process counts capped at 2, ``trainer.seed`` of a multirun at its
first value, and ``launch/train.py`` with the tiny model, a small demo and at most 2 steps
(:func:`documented.train_shrink`); benches get their smoke options (:data:`RUNNERS`;
``bench/search_recall.py --quick`` exists for this).

Every command matches exactly one entry of :data:`RUNNERS` (how it runs, what it must leave behind)
or of :data:`NOT_RUN` (why it cannot run on this machine); a new command in the docs without one
fails :func:`test_every_command_is_run_or_has_a_reason`, naming its file and line. Python commands
run in this process (``runpy``; Hydra's global state cleared), shell scripts and the paddle launcher
in subprocesses (2 CPU processes). Every job of a full multirun sweep is also composed and
validated (:func:`test_documented_train_command_composes`).
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from documented import (
    REPO,
    Command,
    canonical,
    documented_commands,
    localise,
    multirun_jobs,
    run_python,
    split_env,
    train_overrides,
    train_shrink,
)
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from standins import WANDB_UNSET, StandIns

from ernievil2.train.config import register_schemas

register_schemas()


@dataclass
class Outcome:
    """A command as it ran: its words (localised), machine, output, and when it started."""

    command: Command
    words: list[str]
    machine: Path
    output: str
    started: float

    @property
    def cwd(self) -> Path:
        return self.machine / "repo"

    def path(self, written: str) -> Path:
        return self.cwd / written

    def flag(self, name: str) -> str:
        return self.words[self.words.index(name) + 1]

    def key(self, name: str) -> str:
        return next(w.split("=", 1)[1] for w in self.words if w.startswith(f"{name}="))


# ------------------------------------------------------------------------------------ what each command promises


def _run_dirs(o: Outcome) -> list[Path]:
    """Hydra run dirs made by this command (its ``.hydra/`` written after it started)."""
    found = []
    for folder, dirs, _ in os.walk(o.machine):
        if ".hydra" in dirs and (Path(folder) / ".hydra" / "config.yaml").stat().st_mtime >= o.started - 1:
            found.append(Path(folder))
    return sorted(found)


def trained_or_evaluated(o: Outcome) -> None:
    """One run dir per job: a mode=eval run wrote eval_results.json; a training run logged that it
    trained, wrote its last checkpoint (unless save_checkpoint=false) and its final evaluation (if
    any set is configured)."""
    jobs = multirun_jobs(train_overrides(canonical(o.command.words)))
    runs = _run_dirs(o)
    assert len(runs) == len(jobs), f"{len(jobs)} job(s), run dirs: {runs}"
    for run in runs:
        cfg = OmegaConf.to_container(OmegaConf.load(run / ".hydra" / "config.yaml"), resolve=False)
        if cfg["mode"] == "eval":
            assert json.loads((run / "eval_results.json").read_text(encoding="utf-8"))["records"], run
            continue
        steps = cfg["trainer"]["max_steps"]
        log = "".join(p.read_text(encoding="utf-8") for p in run.glob("train*.log"))
        assert re.search(r"trained \d+ steps", log), f"{run}: no 'trained N steps' line"
        if cfg["trainer"]["save_checkpoint"]:
            assert (run / "checkpoints" / f"step_{steps:07d}" / "model.safetensors").is_file(), run
        if (cfg["eval"]["datasets"] or cfg["eval"]["classification"]) and cfg["eval"]["at_end"]:
            metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
            assert {m["step"] for m in metrics} >= {steps}, run


def packed(o: Outcome) -> None:
    out = o.path(o.flag("--output"))
    summary = json.loads((out / "pack_summary.json").read_text(encoding="utf-8"))
    assert summary["written"] > 0 and summary["shards"] == len(list(out.glob("*.tar"))) > 0, summary


def _embedded(out: Path, test_file: Path) -> None:
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(test_file.read_text(encoding="utf-8").splitlines())
    assert all(len(line.split("\t")) == 3 and line.endswith("\t1") for line in lines)


def embedded(o: Outcome) -> None:
    _embedded(o.path(o.key("output_file")), o.path(o.key("test_file")))


def embedded_by_config(o: Outcome) -> None:
    conf = dict(line.split("#")[0].strip().split("=", 1) for line in o.path(o.words[-1]).read_text().splitlines()
                if line.strip() and not line.startswith("#"))
    _embedded(o.path(conf["output_file"]), o.path(conf["test_file"]))


def recall_table(o: Outcome) -> None:
    assert re.search(r"(official 1:1|multi-caption) protocol: \d+ texts, \d+ images", o.output), o.output[-2000:]
    assert "R@1" in o.output, o.output[-2000:]


def exported(o: Outcome) -> None:
    """The Paddle Inference models; with ``--format onnx`` their ONNX conversions, recorded."""
    out = o.path(o.words[2])
    assert (out / "image" / "inference.json").is_file() and (out / "text" / "inference.json").is_file()
    if "--format" in o.words and o.flag("--format") == "onnx":
        assert (out / "image" / "model.onnx").is_file() and (out / "text" / "model.onnx").is_file()
        assert json.loads((out / "export.json").read_text(encoding="utf-8"))["format"] == "onnx"


def benchmark_results(o: Outcome) -> None:
    first = o.words.index("--dataset") + 1
    datasets = list(itertools.takewhile(lambda w: not w.startswith("--"), o.words[first:]))
    results = sorted(o.cwd.glob(re.sub(r"\{\w+\}", "*", o.flag("--output"))))
    assert len(results) == len(datasets), results
    for path in results:
        doc = json.loads(path.read_text(encoding="utf-8"))
        assert set(doc) == {"dataset", "model", "pretrained", "task", "metrics", "language"} and doc["metrics"]


def indexed(o: Outcome) -> None:
    out = o.path(o.flag("--out"))
    assert (out / "vectors.npy").is_file() and json.loads((out / "paths.json").read_text(encoding="utf-8"))


def queried(o: Outcome) -> None:
    hits = [line for line in o.output.splitlines() if re.fullmatch(r"\d+\t-?\d\.\d{4}\t\S.*", line)]
    paths = json.loads((o.path(o.words[3]) / "paths.json").read_text(encoding="utf-8"))
    assert len(hits) == min(int(o.flag("--k")), len(paths)), o.output[-2000:]
    if "--html" in o.words:
        assert o.path(o.flag("--html")).stat().st_size > 0


def compared(o: Outcome) -> None:
    out = o.path(o.flag("--out"))
    assert "| recipe" in (out / "compare.md").read_text(encoding="utf-8") and (out / "compare.png").stat().st_size


def plotted(o: Outcome) -> None:
    assert [p for p in (o.path(o.words[2]) / "plots").glob("*.png") if p.stat().st_size]


def scored(o: Outcome) -> None:
    sidecars = list(o.path(o.flag("--out")).glob("*.scores.npz"))
    assert len(sidecars) == len(list(o.path(o.flag("--shards")).glob("*.tar"))) > 0, sidecars


def selected(o: Outcome) -> None:
    keep = o.path(o.flag("--out"))
    assert keep.read_text(encoding="utf-8").split() and Path(f"{keep}.summary.json").is_file()


def json_written(o: Outcome) -> None:
    assert json.loads(o.path(o.flag("--out")).read_text(encoding="utf-8"))


def bench_results(o: Outcome) -> None:
    assert json.loads((o.path(o.flag("--out")) / "results.json").read_text(encoding="utf-8"))["results"]


def printed(text: str) -> Callable[[Outcome], None]:
    def check(o: Outcome) -> None:
        assert text in o.output, o.output[-2000:]
    return check


# ------------------------------------------------------------------------------------ the tables


@dataclass(frozen=True)
class Runner:
    """How to run the commands ``pattern`` matches: in this process or as a ``process``, with
    ``smoke`` arguments appended, and what ``check`` asserts; ``everything``: the whole machine
    (training reads data named only in configs)."""

    pattern: str
    check: Callable[[Outcome], None]
    process: bool = False
    smoke: tuple[str, ...] = ()
    slow: bool = False
    everything: bool = False


TRAIN = r"^([A-Z0-9_]+=\S* )*"
RUNNERS = {
    "train": Runner(TRAIN + r"python launch/train\.py\b", trained_or_evaluated, slow=True, everything=True),
    "launcher": Runner(r"^python -m paddle\.distributed\.launch --nproc_per_node \d+ launch/train\.py\b",
                       trained_or_evaluated, process=True, slow=True, everything=True),
    "train_node": Runner(r"^NPROC=\d+ launch/train_node\.sh\b", trained_or_evaluated, process=True, slow=True,
                         everything=True),
    "launcher filter": Runner(r"^python -m paddle\.distributed\.launch --nproc_per_node \d+ launch/filter\.py score\b",
                              scored, process=True, slow=True),
    "launcher help": Runner(r"^python -m paddle\.distributed\.launch --help$", printed("--nproc_per_node")),
    "pack": Runner(r"^python launch/pack\.py\b", packed),
    "infer": Runner(r"^python launch/infer\.py\b", embedded),
    "run_infer": Runner(r"^launch/run_infer\.sh\b", embedded_by_config, process=True, slow=True),
    "eval_retri": Runner(r"^python launch/eval_retri\.py\b", recall_table),
    "export": Runner(r"^python launch/export\.py\b", exported),
    "benchmark": Runner(r"^python launch/benchmark\.py eval\b", benchmark_results),
    "search index": Runner(r"^python launch/search\.py index\b", indexed),
    "search query": Runner(r"^python launch/search\.py query\b", queried),
    "filter score": Runner(r"^python launch/filter\.py score\b", scored),
    "filter select": Runner(r"^python launch/filter\.py select\b", selected),
    "compare": Runner(r"^python launch/compare\.py\b", compared),
    "plot": Runner(r"^python launch/plot\.py\b", plotted),
    "bench search": Runner(r"^python bench/search\.py\b", json_written,
                           smoke=("--quick", "--sizes", "2000,5000", "--out", "bench.json"), slow=True),
    "bench search_recall": Runner(r"^python bench/search_recall\.py\b", json_written,
                                  smoke=("--quick", "--out", "bench.json"), slow=True),
    "bench init_spread": Runner(r"^python bench/init_spread\.py\b", json_written, smoke=("--out", "bench.json"),
                                slow=True),
    "bench step_cost": Runner(r"^python bench/step_cost\.py\b", json_written,
                              smoke=("--repeats", "1", "--batch", "8", "--out", "bench.json"), slow=True),
    "bench filter_demo": Runner(r"^python bench/filter_demo\.py\b", bench_results,
                                smoke=("--quick", "--out", "bench_out"), slow=True),
    "bench transfer_demo": Runner(r"^python bench/transfer_demo\.py\b", bench_results,
                                  smoke=("--quick", "--out", "bench_out"), slow=True),
    "bench encode_speed": Runner(r"^python bench/encode_speed\.py\b", json_written,
                                 smoke=("--quick", "--out", "bench.json"), slow=True),
    "bench score_speed": Runner(r"^python bench/score_speed\.py\b", json_written,
                                smoke=("--quick", "--out", "bench.json"), slow=True),
    "bench eval_retri": Runner(r"^python bench/eval_retri\.py\b", printed("| plain"),
                               smoke=("--rounds", "1", "--lines", "200", "--dim", "32"), slow=True),
    "bench data_pipeline": Runner(r"^python bench/data_pipeline\.py\b", printed("| full sample"),
                                  smoke=("--sets", "small", "--limit", "32", "--epochs", "1", "--image-size", "64",
                                         "--batch-size", "8"), slow=True),
}
NOT_RUN = {
    r"^pip install -e ": "installs this package into the environment the tests run in; .ci/run installs it "
                         "(test_ci_runs_the_readme_install_and_test_line)",
    r"^pip install paddlepaddle-gpu": "Paddle's GPU build, from Paddle's own index: no GPU on this machine",
    r"^python -m pytest\b": "the suite this test is part of (it would run itself); .ci/run runs it "
                            "(test_ci_runs_the_readme_install_and_test_line)",
    r"^python bench/train_step\.py .*--amp bf16": "bf16 on a GPU: no GPU on this machine",
    r"^pip install .*open_clip_torch": "torch and open_clip in a separate environment, for the comparison row of "
                                       "bench/encode_speed.py (which skips that row without them)",
    r"--master (10\.0\.0\.1|HOST):": "several nodes, this machine is one: tests/test_multinode.py runs "
                                     "launch/train_multinode.sh (which runs this launcher line) as two nodes "
                                     "over 127.0.0.1",
}


def classify(command: Command) -> list[str]:
    """The names of the RUNNERS and the patterns of NOT_RUN that match ``command``."""
    text = " ".join(canonical(command.words))
    return [name for name, r in RUNNERS.items() if re.search(r.pattern, text)] + \
        [pattern for pattern in NOT_RUN if re.search(pattern, text)]


def runnable() -> list:
    """One pytest param per runnable command (identical command lines once)."""
    seen, params = set(), []
    for command in documented_commands():
        words = tuple(canonical(command.words))
        names = [n for n in classify(command) if n in RUNNERS]
        if len(names) != 1 or words in seen:
            continue
        seen.add(words)
        runner = RUNNERS[names[0]]
        short = re.sub(r"python -m paddle\.distributed\.launch --nproc_per_node (\d+) launch/", r"launch(\1) ",
                       " ".join(words))
        short = re.sub(r"(^|(?<= ))(python )?launch/|python (?=bench/)", "", short)
        params.append(pytest.param(command, runner, id=f"{command.where} {short[:70]}",
                                   marks=[pytest.mark.slow] if runner.slow else []))
    return params


# ------------------------------------------------------------------------------------ the tests


def test_every_command_is_run_or_has_a_reason():
    commands = documented_commands()
    assert {c.where.split(":")[0] for c in commands} >= {
        "README.md", "docs/BENCHMARKS.md", "docs/DATA.md", "docs/DISTRIBUTED.md", "conf/eval/imagenet.yaml",
        "conf/experiment/pretrain_base.yaml", "conf/infer.yaml"}
    wrong = [f"{c.where}: {c.text}  -> {classify(c) or 'nothing'}" for c in commands if len(classify(c)) != 1]
    assert not wrong, "each documented command needs exactly one runner (or a NOT_RUN reason):\n" + "\n".join(wrong)


def test_ci_runs_the_readme_install_and_test_line():
    """.ci/run installs and tests with the README's Quickstart line (the install before the tests);
    every documented ``pip install -e`` names extras that pyproject.toml defines."""
    readme = [c for c in documented_commands() if c.where.startswith("README.md")]
    install = next(c for c in readme if c.words[:3] == ("pip", "install", "-e") and "test" in c.words[3])
    tests = next(c for c in readme if c.where == install.where and c.words[1:3] == ("-m", "pytest"))
    ci = [[tuple(g) for is_and, g in itertools.groupby(shlex.split(line, comments=True), lambda w: w == "&&")
           if not is_and] for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert any(install.words in line and tests.words in line and line.index(install.words) < line.index(tests.words)
               for line in ci), f".ci/run does not run {install.text} && {tests.text}"
    extras = set(re.findall(r"^(\w+) = \[", (REPO / "pyproject.toml").read_text(encoding="utf-8"), flags=re.M))
    for c in documented_commands():
        if c.words[:3] == ("pip", "install", "-e"):
            named = re.fullmatch(r"\.(?:\[([\w,]+)\])?", c.words[3])
            assert named and set(filter(None, (named[1] or "").split(","))) <= extras, c


@pytest.mark.parametrize("command", [pytest.param(c, id=c.where) for c in documented_commands()
                                     if train_overrides(list(c.words)) is not None])
def test_documented_train_command_composes(command: Command, monkeypatch):
    """Every job of the full sweep (every seed) composes and validates against the typed schema."""
    from ernievil2.train.config import validate

    monkeypatch.setenv("REAL_MIX_ROOT", "/data/packed")
    monkeypatch.setenv("ERNIEVIL2_SHARED", "/data/shared")
    monkeypatch.setenv("COCO_CN_TSV", "/data/coco-cn.tsv")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for job in multirun_jobs(train_overrides(canonical(command.words, all_seeds=True))):
            cfg = compose(config_name="config", overrides=job, return_hydra_config=True)
            with open_dict(cfg):
                del cfg["hydra"]
            validate(cfg)


@pytest.fixture(scope="session")
def standins(tmp_path_factory) -> StandIns:
    return StandIns(tmp_path_factory.mktemp("standins"))


def _outputs(words: list[str]) -> set[str]:
    """The paths a command writes, as written (never replaced by a stand-in)."""
    out = {words[i + 1] for i, w in enumerate(words[:-1]) if w in ("--output", "--out")}
    keys = ("output_file", "hydra.run.dir", "hydra.sweep.dir")
    out |= {w.split("=", 1)[1] for w in words if w.split("=", 1)[0] in keys}
    return {o.rstrip("/") for o in out}


def _run_process(words: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """A subprocess with this interpreter as ``python``, without launcher variables of the caller."""
    env = {k: v for k, v in {**os.environ, **env}.items() if not k.startswith("PADDLE_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    words = [sys.executable if i == 0 and w in ("python", "python3") else w for i, w in enumerate(words)]
    proc = subprocess.run(words, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    logs = sorted((cwd / "log").glob("workerlog.*"))  # the launcher's, one per rank
    ranks = "".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in logs)
    return proc.returncode, proc.stdout + proc.stderr + ranks


@pytest.mark.parametrize("command,runner", runnable())
def test_documented_command_runs(command: Command, runner: Runner, standins: StandIns, tmp_path, monkeypatch, capfd):
    """The command, shrunk, on a stand-in machine: exit status 0 and what its runner checks."""
    for var in WANDB_UNSET:
        monkeypatch.delenv(var, raising=False)
    machine = standins.machine(tmp_path)
    words = [*canonical(command.words), *runner.smoke]
    standins.populate(machine, " ".join(words), _outputs(words), everything=runner.everything)
    words = localise(words, machine, machine / "repo")
    overrides = train_overrides(words)
    if overrides is not None:
        words += train_shrink(overrides, standins.demo_cache)
    own_env, argv = split_env(words)
    env = {**standins.environment(machine), **own_env}
    capfd.readouterr()
    started = time.time()
    if runner.process:
        status, output = _run_process(argv, machine / "repo", env)
    else:
        status = run_python(argv[1:], machine / "repo", env)
        output = "".join(capfd.readouterr())
    assert status == 0, f"{command.where}: {' '.join(words)}\nexit status {status}\n{output[-6000:]}"
    runner.check(Outcome(command, argv, machine, output, started))
