"""ernievil2.plots and launch/plot.py: the PNGs of a run dir, from a synthetic train_log.jsonl and metrics.jsonl."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ernievil2 import plots as plot
from ernievil2.losses import TERMS

REPO = Path(__file__).resolve().parents[1]
RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")

def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _train_record(step: int) -> dict:
    terms = {t: 2.0 + i - 0.01 * step for i, t in enumerate(TERMS)}
    return {"step": step, "loss": sum(terms.values()), **terms, "lr": 1e-3 * step / 20, "logit_scale": 14.0 + 0.1 * step,
            "grad_norm": 3.0 / step, "samples_per_s": 50.0, "data_wait_s": 0.02, "bad/corrupt_image": step // 10,
            "epoch": 0}


def _eval_record(step: int, dataset: str, protocol: str) -> dict:
    recalls = {k: float(i + step) for i, k in enumerate(RECALL_KEYS)}
    return {"step": step, "dataset": dataset, "protocol": protocol, **recalls,
            "mean_recall": sum(recalls.values()) / 6}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    _write_jsonl(tmp_path / "train_log.jsonl", [_train_record(s) for s in range(5, 45, 5)])
    _write_jsonl(tmp_path / "metrics.jsonl", [_eval_record(s, d, p) for s in (20, 40)
                                              for d, p in (("demo_val", "multi"), ("coco-cn", "official"))])
    return tmp_path


def test_writes_one_png_per_plot(run_dir, tmp_path):
    out = tmp_path / "pngs"
    written = plot.plot_run(run_dir, out)
    expected = {"losses.png", "bad_samples.png", "lr.png", "logit_scale.png", "grad_norm.png", "samples_per_s.png",
                "data_wait_s.png", "recall_demo_val_multi.png", "recall_coco-cn_official.png"}
    assert {p.name for p in written} == expected
    assert {p.name for p in out.iterdir()} == expected
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            width, height = image.size
            # Not a blank canvas: a plot has many distinct colours (lines, text, grid).
            assert width >= 400 and height >= 300 and len(image.convert("RGB").getcolors(1 << 20)) > 20, path
    with Image.open(out / "losses.png") as image:  # 5 loss panels laid out 3 x 2: wider than tall
        assert image.size[0] > 1.5 * image.size[1]


def test_series_sorted_with_last_value_per_step():
    records = [{"step": 10, "loss": 3.0, "epoch": 0}, {"step": 20, "loss": 2.0, "bad/x": 1},
               {"step": 10, "loss": 2.5, "note": "resumed"}, {"step": 30, "loss": float("nan")}]
    series = plot.to_series(records)
    assert series == {"loss": ([10, 20], [2.5, 2.0]), "bad/x": ([20], [1.0])}
    assert all(plot.is_loss(t) for t in ("loss", *TERMS, "loss_image_caption")) and not plot.is_loss("lr")


def test_recall_styles():
    assert plot.recall_style("i2t_r5") == ("image→text R@5", {"color": "tab:orange", "linestyle": "-"})
    assert plot.recall_style("t2i_mean") == ("text→image mean", {"color": "tab:gray", "linestyle": "--"})
    assert plot.recall_style("mean_recall")[0] == "mean recall" and plot.recall_style("ndcg") == ("ndcg", {})


@pytest.mark.slow
def test_default_out_dir_and_cli(run_dir):
    proc = subprocess.run([sys.executable, "launch/plot.py", str(run_dir)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.split()
    assert len(printed) == 9 and all(Path(p).parent == run_dir / "plots" and Path(p).is_file() for p in printed)


def test_errors_name_the_problem(tmp_path):
    proc = subprocess.run([sys.executable, "launch/plot.py", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (f"plot.py: error: {tmp_path}: no train_log.jsonl or metrics.jsonl "
                                                    "with records (is it a run dir?)")
    (tmp_path / "metrics.jsonl").write_text('{"step": 5, "dataset": "d", "protocol": "multi"}\n{oops\n')
    with pytest.raises(plot.LogFormatError, match=r"metrics\.jsonl:2: not JSON: invalid JSON"):
        plot.plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"dataset": "d"}\n')
    with pytest.raises(plot.LogFormatError, match=r"metrics\.jsonl:1: expected an object with an integer 'step'"):
        plot.plot_run(tmp_path)


def test_eval_only_run_dir(tmp_path):
    _write_jsonl(tmp_path / "metrics.jsonl", [_eval_record(7, "demo_val", "multi")])
    assert [p.name for p in plot.plot_run(tmp_path)] == ["recall_demo_val_multi.png"]


def test_zeroshot_records_get_their_own_plot(tmp_path):
    records = [{"step": s, "dataset": "demo_objects_en", "protocol": "zeroshot", "top1": 10.0 + s, "top5": 30.0 + s,
                "n_images": 500, "n_classes": 24, "chance_top1": 100 / 24} for s in (10, 20)]
    _write_jsonl(tmp_path / "metrics.jsonl", [_eval_record(10, "demo_val", "multi"), *records])
    written = plot.plot_run(tmp_path)
    assert [p.name for p in written] == ["recall_demo_val_multi.png", "zeroshot_demo_objects_en.png"]
