"""RunLogger: JSONL always, wandb offline read back from its own run file, resume by id, mode choice."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import wandb
from hydra import compose, initialize_config_dir

from ernievil2.losses import TERMS
from ernievil2.train.config import LoggerSchema, register_schemas
from ernievil2.train.loggers import (
    RUN_ID_FILE,
    STEP_METRIC,
    RunLogger,
    resolve_wandb_mode,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")

register_schemas()


@pytest.fixture
def wandb_env(tmp_path, monkeypatch) -> Path:
    """wandb offline, silent, without credentials, and with all its folders inside tmp_path."""
    home = tmp_path / "wandb_home"
    home.mkdir()
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
           "WANDB_DIR": home / "dir", "WANDB_CACHE_DIR": home / "cache", "WANDB_CONFIG_DIR": home / "config",
           "WANDB_DATA_DIR": home / "data", "WANDB_ARTIFACT_DIR": home / "artifacts", "NETRC": home / "netrc"}
    for var, value in env.items():
        monkeypatch.setenv(var, str(value))
    return home


# ------------------------------------------------------------------ reading wandb's transaction log
# wandb decodes its own run file: ``wandb leet inspect --json RUN.wandb`` prints each record of the
# transaction log as one JSON object ({"num", "type", <type>: {...}}); a history item maps each key
# (a table's fields joined with '.') to its logged value.


def read_wandb_records(path: Path) -> list[dict]:
    """Every record of a wandb run file, as wandb's own reader gives it."""
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"wandb could not read {path}: {proc.stderr[-2000:]}"
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert records and records[0]["type"] == "header", f"{path}: not a wandb run file"
    return records


def of_type(records: list[dict], kind: str) -> list[dict]:
    return [r[kind] for r in records if r["type"] == kind]


def history_rows(records: list[dict]) -> list[dict]:
    """Each history record as {key: value}."""
    return [h["item"] for h in of_type(records, "history")]


def config_updates(records: list[dict]) -> dict:
    """The run's config: what the run record started with, then every config update in order."""
    config: dict = {}
    for r in records:
        if r["type"] == "run":
            config.update(r["run"].get("config", {}).get("update", {}))
        elif r["type"] == "config":
            config.update(r["config"].get("update", {}))
    return config


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def finished_run_records(run_dir: Path, run_id: str) -> tuple[Path, list[dict]]:
    """The one offline run folder of ``run_dir`` and its records, once wandb has written them all:
    ``run.finish()`` can return before wandb's service flushes the file; ``wandb.teardown()`` waits."""
    wandb.teardown()
    (folder,) = offline_runs(run_dir)
    return folder, read_wandb_records(folder / f"run-{run_id}.wandb")


# ------------------------------------------------------------------ synthetic numbers

def train_scalars(step: int) -> dict:
    terms = {t: 0.5 + 0.1 * i + 1.0 / step for i, t in enumerate(TERMS)}
    return {"loss": sum(terms.values()), **terms, "lr": 1e-3 / step, "logit_scale": 14.0 + step,
            "grad_norm": 2.5 / step, "samples_per_s": 100.0 + step, "data_wait_s": 0.01 * step,
            "bad/corrupt_image": step // 5, "epoch": 0}


def eval_record(step: int, dataset: str = "demo_val", protocol: str = "multi") -> dict:
    recalls = {k: float(10 * i + step) for i, k in enumerate(RECALL_KEYS)}
    means = {f"{d}_mean": sum(recalls[f"{d}_r{k}"] for k in (1, 5, 10)) / 3 for d in ("i2t", "t2i")}
    return {"step": step, "dataset": dataset, "protocol": protocol, **recalls, **means,
            "mean_recall": sum(recalls.values()) / len(recalls)}


def _wandb_cfg(**overrides) -> LoggerSchema:
    return LoggerSchema(**{"backend": "wandb", "project": "ernievil2-test", "name": "unit", **overrides})


# ------------------------------------------------------------------ tests

def test_none_backend_writes_jsonl(tmp_path, caplog):
    logger = RunLogger(tmp_path, LoggerSchema())
    with caplog.at_level(logging.INFO, logger="ernievil2"):
        logger.log_train(5, train_scalars(5))
        logger.log_eval([eval_record(5)])
    logger.close()
    assert logger.run_id is None
    assert not (tmp_path / "wandb").exists() and not (tmp_path / RUN_ID_FILE).exists()
    train = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert train == [{"step": 5, **train_scalars(5)}]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [eval_record(5)]
    assert "step 5 | loss " in caplog.text and "bad/corrupt_image 1" in caplog.text


def test_other_ranks_write_nothing(tmp_path, wandb_env):
    logger = RunLogger(tmp_path / "run", _wandb_cfg(), write_files=False)
    logger.log_train(1, train_scalars(1))
    logger.log_eval([eval_record(1)])
    logger.close()
    assert logger.run_id is None and not (tmp_path / "run").exists()


def test_wandb_offline_run_holds_losses_recalls_and_tables(tmp_path, wandb_env):
    config = {"loss": {"image_caption": 1.0}, "trainer": {"max_steps": 10}}
    logger = RunLogger(tmp_path, _wandb_cfg(tags=["unit"]), config)
    for step in (5, 10):
        logger.log_train(step, train_scalars(step))
    logger.log_eval([eval_record(5), eval_record(5, "seed_zh", "official")])
    logger.log_eval([eval_record(10), eval_record(10, "seed_zh", "official")])
    run_id = logger.run_id
    logger.close()

    assert (tmp_path / RUN_ID_FILE).read_text().strip() == run_id
    folder, records = finished_run_records(tmp_path, run_id)
    (run,) = of_type(records, "run")
    assert (run["run_id"], run["project"], run.get("display_name")) == (run_id, "ernievil2-test", "unit")
    assert run.get("tags") == ["unit"]
    config_items = config_updates(records)
    assert config_items["loss"] == {"image_caption": 1.0} and config_items["trainer"] == {"max_steps": 10}

    rows = history_rows(records)
    train_rows = {row[STEP_METRIC]: row for row in rows if "train/loss" in row}
    assert sorted(train_rows) == [5, 10]
    for step, row in train_rows.items():
        for name, value in train_scalars(step).items():  # every view's loss term, lr, scale, ...
            assert row[f"train/{name}"] == pytest.approx(value, rel=1e-12), (step, name)
    for dataset, protocol in (("demo_val", "multi"), ("seed_zh", "official")):
        prefix = f"eval/{dataset}/{protocol}"
        eval_rows = {row[STEP_METRIC]: row for row in rows if f"{prefix}/mean_recall" in row}
        assert sorted(eval_rows) == [5, 10]
        for step, row in eval_rows.items():
            expected = eval_record(step, dataset, protocol)
            for k in (*RECALL_KEYS, "i2t_mean", "t2i_mean", "mean_recall"):
                assert row[f"{prefix}/{k}"] == pytest.approx(expected[k], rel=1e-12), (prefix, step, k)
        # The table logged at step 10 has one row per evaluation so far.
        last = eval_rows[10]
        assert last[f"{prefix}/table._type"] == "table-file" and last[f"{prefix}/table.nrows"] == 2
        table = json.loads((folder / "files" / last[f"{prefix}/table.path"]).read_text())
        assert table["columns"] == ["step", *RECALL_KEYS, "i2t_mean", "t2i_mean", "mean_recall"]
        assert table["data"] == [[s, *(eval_record(s, dataset, protocol)[k] for k in table["columns"][1:])]
                                 for s in (5, 10)]
    # Every train/ and eval/ metric is plotted against the optimizer step.
    step_metrics = {m.get("glob_name") or m.get("name"): m.get("step_metric") for m in of_type(records, "metric")}
    assert step_metrics.get("train/*") == STEP_METRIC and step_metrics.get("eval/*") == STEP_METRIC


def test_resumed_logger_continues_the_same_run(tmp_path, wandb_env):
    first = RunLogger(tmp_path / "a", _wandb_cfg())
    first.log_train(5, train_scalars(5))
    run_id = first.run_id
    first.close()

    # From a checkpoint's stored id, in another run dir.
    resumed = RunLogger(tmp_path / "b", _wandb_cfg(), resume_id=run_id)
    resumed.log_train(10, train_scalars(10))
    assert resumed.run_id == run_id
    resumed.close()
    rows = history_rows(finished_run_records(tmp_path / "b", run_id)[1])
    assert [row[STEP_METRIC] for row in rows if "train/loss" in row] == [10]

    # Restarted in the first run dir without an id: wandb_run_id.txt gives it.
    again = RunLogger(tmp_path / "a", _wandb_cfg())
    assert again.run_id == run_id
    again.close()
    run_files = [f.name for folder in offline_runs(tmp_path / "a") for f in folder.glob("run-*.wandb")]
    assert run_files == [f"run-{run_id}.wandb"] * 2

    fresh = RunLogger(tmp_path / "c", _wandb_cfg())
    assert fresh.run_id not in (None, run_id)
    fresh.close()


def test_disabled_mode_has_no_run_id(tmp_path, wandb_env):
    logger = RunLogger(tmp_path, _wandb_cfg(mode="disabled"))
    logger.log_train(1, train_scalars(1))
    logger.log_eval([eval_record(1)])
    logger.close()
    assert logger.run_id is None
    assert not (tmp_path / RUN_ID_FILE).exists() and not offline_runs(tmp_path)
    assert (tmp_path / "train_log.jsonl").exists() and (tmp_path / "metrics.jsonl").exists()


def test_mode_choice(wandb_env, monkeypatch, caplog):
    assert resolve_wandb_mode("disabled") == "disabled"  # logger.mode wins over WANDB_MODE
    assert resolve_wandb_mode(None) == "offline"  # WANDB_MODE
    monkeypatch.setenv("WANDB_MODE", "online")
    assert resolve_wandb_mode(None) == "online"
    monkeypatch.delenv("WANDB_MODE")
    with caplog.at_level(logging.WARNING, logger="ernievil2"):
        assert resolve_wandb_mode(None) == "offline"  # no key anywhere
    notices = [r.getMessage() for r in caplog.records if "wandb" in r.getMessage()]
    assert len(notices) == 1 and "offline" in notices[0] and "\n" not in notices[0]
    # A netrc entry for the wandb host, or for WANDB_BASE_URL's host, lets wandb go online.
    (wandb_env / "netrc").write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert resolve_wandb_mode(None) is None
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert resolve_wandb_mode(None) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_wandb_mode(None) is None


@pytest.mark.parametrize("field, value, message", [
    ("backend", "tensorboard", "logger.backend"), ("mode", "cloud", "logger.mode"), ("log_every", 0, "logger.log_every"),
])
def test_schema_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        LoggerSchema(**{field: value})


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_training_run_logs_to_offline_wandb(tmp_path, wandb_env):
    from ernievil2.train.run import run_training

    overrides = [
        "logger=wandb", "logger.log_every=2", "trainer.max_steps=4", "eval.every_n_steps=2",
        "data.demo.n_train=64", "data.demo.n_val=16", "data.demo.samples_per_shard=32",
        f"data.demo.cache_dir={tmp_path / 'demo'}", "data.batch_size=8", "data.num_workers=0",
        "data.shuffle_buffer=16", "trainer.device=cpu", "trainer.save_checkpoint=false",
        "loss.image_image=1", "loss.text_text=1", "loss.aux_fraction=0.25",  # all four terms
    ]
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    run_dir = tmp_path / "run"
    final = run_training(cfg, run_dir)

    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    _, records = finished_run_records(run_dir, run_id)
    rows = history_rows(records)
    logged = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    train_rows = {row[STEP_METRIC]: row for row in rows if "train/loss" in row}
    assert sorted(train_rows) == [r["step"] for r in logged] == [2, 4]
    for r in logged:  # wandb holds exactly the numbers of train_log.jsonl, each view's term included
        assert set(TERMS) <= set(r)
        for name, value in r.items():
            if name != "step":
                assert train_rows[r["step"]][f"train/{name}"] == pytest.approx(value, rel=1e-12), name
    prefix = "eval/demo_val/multi"
    eval_rows = {row[STEP_METRIC]: row for row in rows if f"{prefix}/mean_recall" in row}
    assert sorted(eval_rows) == [2, 4]
    for k in (*RECALL_KEYS, "mean_recall"):
        assert eval_rows[4][f"{prefix}/{k}"] == pytest.approx(final[0][k], rel=1e-12), k
    config = config_updates(records)
    assert config["trainer"]["max_steps"] == 4 and config["logger"]["backend"] == "wandb"


@pytest.mark.slow
def test_resumed_training_continues_the_wandb_run_of_its_checkpoint(tmp_path, wandb_env):
    """A run resumed from a checkpoint into another run dir logs to the wandb run that wrote the
    checkpoint (its id travels in trainer_state.json)."""
    from ernievil2.train.run import run_training

    overrides = [
        "logger=wandb", "logger.log_every=1", "trainer.max_steps=4", "trainer.checkpoint_every=2", "eval=none",
        "data.demo.n_train=64", "data.demo.n_val=16", "data.demo.samples_per_shard=32",
        f"data.demo.cache_dir={tmp_path / 'demo'}", "data.batch_size=8", "data.num_workers=0",
        "data.shuffle_buffer=16", "trainer.device=cpu",
    ]
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        first = compose(config_name="config", overrides=overrides)
        again = compose(config_name="config", overrides=[
            *overrides, f"resume={tmp_path / 'a' / 'checkpoints' / 'step_0000002'}"])
    run_training(first, tmp_path / "a")
    run_id = (tmp_path / "a" / RUN_ID_FILE).read_text().strip()
    state = json.loads((tmp_path / "a" / "checkpoints" / "step_0000002" / "trainer_state.json").read_text())
    assert state["extra"]["wandb_run_id"] == run_id
    run_training(again, tmp_path / "b")
    assert (tmp_path / "b" / RUN_ID_FILE).read_text().strip() == run_id
    _, records = finished_run_records(tmp_path / "b", run_id)
    steps = sorted(row[STEP_METRIC] for row in history_rows(records) if "train/loss" in row)
    assert steps == [3, 4]
