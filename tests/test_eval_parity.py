"""One evaluation file, two paths, the same numbers: the in-loop evaluation of a checkpoint
(``mode=eval``, official 1:1 protocol) and ``launch/infer.py`` + ``launch/eval_retri.py``.

Both read images through ernievil2.data.preprocess (``official`` profile) and embed in the same
batches, so the recalls agree exactly."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_in_loop_eval_equals_infer_then_eval_retri(seed_sample: Path, tmp_path: Path):
    seed_file = seed_sample
    run = tmp_path / "run"
    _run(["launch/train.py", "trainer.max_steps=30", "data.batch_size=32", "data.demo.n_train=512", "data.demo.n_val=40",
          "data.num_workers=0", "eval=none", f"hydra.run.dir={run}", f"data.demo.cache_dir={tmp_path / 'cache'}"])
    ckpt = run / "checkpoints" / "step_0000030"
    assert ckpt.is_dir(), sorted(p.name for p in (run / "checkpoints").iterdir())

    # path 1: mode=eval with the upstream evaluation file as an evaluation set, 1:1 protocol, batches of 64
    evaluated = tmp_path / "eval"
    _run(["launch/train.py", "mode=eval", f"ckpt={ckpt}", "eval=coco_cn", f"eval.datasets.0.path={seed_file}",
          "eval.datasets.0.protocol=official", "eval.batch_size=64", f"hydra.run.dir={evaluated}"])
    [record] = [json.loads(line) for line in (evaluated / "metrics.jsonl").read_text().splitlines()]
    assert (record["dataset"], record["protocol"]) == ("coco_cn", "official")

    # path 2: the upstream release's two steps, inference then eval_retri (same text length, same batches)
    out = tmp_path / "emb.tsv"
    _run(["launch/infer.py", f"test_file={seed_file}", f"output_file={out}", f"model.init_from={ckpt}",
          "text_max_length=32", "batch_size=64", "device=cpu"])
    printed = _run(["launch/eval_retri.py", str(out)]).stdout
    rows = {line.split("|")[1].strip(): [float(x) for x in line.split("|")[2:5]]
            for line in printed.splitlines() if line.startswith("| Text2Image") or line.startswith("| Image2Text")}
    assert rows["Text2Image"] == pytest.approx([record[k] for k in ("t2i_r1", "t2i_r5", "t2i_r10")], abs=0.005), printed
    assert rows["Image2Text"] == pytest.approx([record[k] for k in ("i2t_r1", "i2t_r5", "i2t_r10")], abs=0.005), printed
    want = rows["Text2Image"] + rows["Image2Text"]
    assert len(set(want)) > 1 or want[0] not in (0.0, 100.0), "degenerate model: all recalls equal"
