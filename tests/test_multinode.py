"""Multi-node launch and failure handling, with real processes on CPU (gloo).

- Two launchers on this machine act as two nodes over 127.0.0.1 (``launch/train_multinode.sh``:
  ``--nnodes 2``, one process each): they train a few steps of the demo, both exit 0, and both
  ranks end with identical parameters (the trainer's digest, logged per rank, equal to the
  digest of rank 0's checkpoint).
- SIGKILL of one rank of a running 2-process job: the launcher exits non-zero within 60 s and
  every process of the job (ranks, data-loader workers) is gone; nothing hangs. The same for a
  two-node job: both launchers exit non-zero.
- ``launch/train_node.sh`` / ``launch/train_multinode.sh`` build the launcher command they promise.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from ernievil2.distributed import parameter_digest
from ernievil2.weights.load import load_model

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN = REPO_ROOT / "launch" / "train.py"
NODE_SH = REPO_ROOT / "launch" / "train_node.sh"
MULTINODE_SH = REPO_ROOT / "launch" / "train_multinode.sh"
KILL_DEADLINE_S = 60


def _env() -> dict[str, str]:
    """This environment without launcher variables; the scripts run this interpreter."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PADDLE_") and k not in ("RANK", "WORLD_SIZE", "ERNIEVIL2_RUN_TIME")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHON"] = sys.executable
    return env


def _overrides(tmp: Path, *extra: str) -> list[str]:
    """The small demo of tests/test_distributed.py's launcher test, without evaluation."""
    return [
        "trainer.device=cpu", "eval=none", "data.demo.n_train=160", "data.demo.n_val=16",
        "data.demo.samples_per_shard=40", f"data.demo.cache_dir={tmp / 'cache'}", "data.batch_size=8",
        "data.num_workers=1", "data.shuffle_buffer=32", "model.vision.layers=1", "model.text.layers=1", *extra,
    ]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- processes through /proc (no psutil here) --------------------------------------------------


def _stat(pid: int) -> Optional[tuple[int, str]]:
    """(parent pid, state letter) of ``pid``, or None when it no longer exists."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rindex(")") + 2:].split()  # the command name may contain spaces
    return int(rest[1]), rest[0]


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[1] not in ("Z", "X")


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None and st[0] == pid:
                out.append(int(entry))
    return out


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        found += kids
        todo += kids
    return found


def _trainer_id(pid: int) -> Optional[int]:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"PADDLE_TRAINER_ID="):
            return int(item.split(b"=", 1)[1])
    return None


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _stop(procs: list[subprocess.Popen], extra: list[int] = ()) -> None:
    """SIGKILL the launchers (each leads its own process group), every process below them and
    ``extra``; reap them."""
    pids = list(extra)
    for p in procs:
        pids += _descendants(p.pid)
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    _kill_all(pids)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _logs(*dirs: Path) -> str:
    return "".join(f"\n==== {p}\n{p.read_text(errors='replace')[-4000:]}"
                   for d in dirs for p in sorted(d.glob("*")) if p.is_file())


# ------------------------------------------------------------------------------------------------


def test_scripts_build_the_launcher_command(tmp_path):
    """With PYTHON=echo the scripts print the command they would run."""
    env = {**_env(), "PYTHON": "echo", "NPROC": "3"}
    out = subprocess.run(["bash", str(NODE_SH), "trainer.max_steps=5"], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["-m", "paddle.distributed.launch", "--nproc_per_node", "3", str(TRAIN), "trainer.max_steps=5"]
    out = subprocess.run(["bash", str(MULTINODE_SH), "--master", "10.1.2.3:8090", "--nnodes", "4", "--rank", "2",
                          "--nproc_per_node", "8", "--", "experiment=x", "trainer.max_steps=5"],
                         env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["-m", "paddle.distributed.launch", "--master", "10.1.2.3:8090", "--nnodes", "4", "--rank", "2",
                   "--nproc_per_node", "8", "--job_id", "ernievil2", str(TRAIN), "experiment=x", "trainer.max_steps=5"]
    for bad, message in (
        (["--nnodes", "2", "--rank", "0"], "--master HOST:PORT is required"),
        (["--master", "h:1", "--nnodes", "2", "--rank", "2"], "--rank 2 must be below --nnodes 2"),
        (["--master", "h:1", "--nnodes", "2", "--rank", "0", "trainer.max_steps=5"], "overrides go after --"),
    ):
        proc = subprocess.run(["bash", str(MULTINODE_SH), *bad], env=env, capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr, (bad, proc.stderr)


def _start_two_nodes(tmp_path, port: int, overrides: list[str]) -> list[subprocess.Popen]:
    """Two launchers on this machine acting as nodes 0 and 1 over 127.0.0.1, one process each."""
    procs = []
    for node in (0, 1):
        cmd = ["bash", str(MULTINODE_SH), "--master", f"127.0.0.1:{port}", "--nnodes", "2", "--rank", str(node),
               "--nproc_per_node", "1", "--log_dir", str(tmp_path / f"log{node}"), "--", *overrides]
        with open(tmp_path / f"launcher{node}.out", "w") as out:
            procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    return procs


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_nodes_over_loopback(tmp_path):
    port = _free_port()
    overrides = _overrides(tmp_path, "trainer.max_steps=6", "logger.log_every=2")
    procs: list[subprocess.Popen] = []
    try:
        procs.extend(_start_two_nodes(tmp_path, port, overrides))
        deadline = time.monotonic() + 150
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                pytest.fail(f"the two-node job did not finish in time{_logs(tmp_path / 'log0', tmp_path / 'log1')}")
    finally:
        _stop(procs)
    logs = _logs(tmp_path / "log0", tmp_path / "log1") + "".join(
        (tmp_path / f"launcher{n}.out").read_text(errors="replace")[-3000:] for n in (0, 1))
    assert codes == [0, 0], logs

    # Node R's only process (workerlog.0 in its log dir) is global rank R of a world of 2.
    digests = {}
    for node in (0, 1):
        text = (tmp_path / f"log{node}" / "workerlog.0").read_text(errors="replace")
        assert f"rank {node} of 2" in text, text[-3000:]
        assert "step 6 | loss" in text
        found = re.findall(r"rank (\d): parameters identical on all 2 ranks \(digest ([0-9a-f]+)\)", text)
        assert len(found) == 1 and int(found[0][0]) == node, text[-3000:]
        digests[node] = found[0][1]
    ckpts = list((tmp_path / "outputs" / "demo").glob("*/checkpoints/step_0000006"))
    assert len(ckpts) == 1, ckpts  # one shared run dir, one writer
    assert digests[0] == digests[1] == parameter_digest(load_model(ckpts[0]).model)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_killed_rank_ends_the_job(tmp_path):
    log_dir = tmp_path / "log"
    overrides = _overrides(tmp_path, "trainer.max_steps=100000", "logger.log_every=1",
                           "trainer.save_checkpoint=false")
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(log_dir),
           str(TRAIN), *overrides]
    with open(tmp_path / "launcher.out", "w") as out:
        launcher = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    job: list[int] = []
    try:
        # Wait until both ranks are training (their step-2 lines are in their logs).
        deadline = time.monotonic() + 100
        while True:
            texts = [(log_dir / f"workerlog.{r}").read_text(errors="replace") if (log_dir / f"workerlog.{r}").exists()
                     else "" for r in (0, 1)]
            if all("step 2 | loss" in t for t in texts):
                break
            if launcher.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the job did not start training (launcher rc {launcher.poll()}){_logs(log_dir)}")
            time.sleep(0.5)
        ranks = {_trainer_id(pid): pid for pid in _children(launcher.pid)}
        assert set(ranks) == {0, 1}, ranks
        # A tiny epoch lasts a fraction of a second and its loader workers are replaced at each
        # epoch's end: look again until the snapshot catches them.
        snapshot_deadline = time.monotonic() + 20
        job = _descendants(launcher.pid)
        while not any(pid not in ranks.values() for pid in job) and time.monotonic() < snapshot_deadline:
            time.sleep(0.02)
            job = _descendants(launcher.pid)
        assert any(pid not in ranks.values() for pid in job), "expected data-loader worker processes too"

        os.kill(ranks[1], signal.SIGKILL)
        start = time.monotonic()
        try:
            code = launcher.wait(timeout=KILL_DEADLINE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launcher still runs {KILL_DEADLINE_S} s after rank 1 was killed{_logs(log_dir)}")
        elapsed = time.monotonic() - start
        print(f"launcher exited {code} {elapsed:.1f} s after SIGKILL of rank 1 (pid {ranks[1]}); job pids {job}")
        assert code != 0, f"launcher exited 0 after a rank was killed{_logs(log_dir)}"
        assert elapsed < KILL_DEADLINE_S
        # Nothing lingers: rank 0 (blocked in a collective) and all loader workers are gone.
        linger_deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in job) and time.monotonic() < linger_deadline:
            time.sleep(0.5)
        left = [pid for pid in job if _alive(pid)]
        assert not left, f"processes still alive after the launcher exited: {left}"
    finally:
        _stop([launcher], job)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_killed_rank_ends_a_two_node_job(tmp_path):
    """The same across two launchers (nodes over 127.0.0.1): SIGKILL of node 1's rank makes both
    launchers exit non-zero (node 0's rank sees its gloo peer's connection reset)."""
    port = _free_port()
    overrides = _overrides(tmp_path, "trainer.max_steps=100000", "logger.log_every=1", "trainer.save_checkpoint=false")
    procs: list[subprocess.Popen] = []
    job: list[int] = []
    try:
        procs.extend(_start_two_nodes(tmp_path, port, overrides))
        logs = [tmp_path / f"log{node}" / "workerlog.0" for node in (0, 1)]
        deadline = time.monotonic() + 100
        while not all(p.exists() and "step 2 | loss" in p.read_text(errors="replace") for p in logs):
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                pytest.fail(f"the two-node job did not start training{_logs(tmp_path / 'log0', tmp_path / 'log1')}")
            time.sleep(0.5)
        job = [pid for p in procs for pid in _descendants(p.pid)]
        victims = [pid for pid in _children(procs[1].pid) if _trainer_id(pid) == 1]
        assert len(victims) == 1, _children(procs[1].pid)

        os.kill(victims[0], signal.SIGKILL)
        start = time.monotonic()
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=max(1.0, KILL_DEADLINE_S - (time.monotonic() - start))))
            except subprocess.TimeoutExpired:
                pytest.fail(f"a launcher still runs {KILL_DEADLINE_S} s after rank 1 was killed"
                            f"{_logs(tmp_path / 'log0', tmp_path / 'log1')}")
        print(f"launchers exited {codes} {time.monotonic() - start:.1f} s after SIGKILL of rank 1")
        assert all(code != 0 for code in codes), codes
        linger_deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in job) and time.monotonic() < linger_deadline:
            time.sleep(0.5)
        assert not [pid for pid in job if _alive(pid)]
    finally:
        _stop(procs, job)
