"""Experiment tracking against real trackers: an `mlflow server` process (SQLite, local artifacts) and
W&B in offline mode. Runs are read back through MLflow's client and W&B's own run files.

Also tracked: the 2-worker run in a bucket whose worker is killed (tests/test_storage_runs.py: one
MLflow run across the restart) and the interrupted, resumed Tune search (tests/test_tune.py: one
parent run, one child per trial)."""

import json
import logging
import struct
import threading
import time
from pathlib import Path

import pytest

from bigray.artifacts.tracking import TRACKING, resolved
from bigray.config import ConfigError, GPTPretrainConfig, TrackingConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def test_tracking_resolves_from_the_standard_environment_variables():
    assert resolved(TrackingConfig(), {}).backend == "none"
    t = resolved(TrackingConfig(), {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "MLFLOW_EXPERIMENT_NAME": "lm"})
    assert (t.backend, t.uri, t.experiment) == ("mlflow", "http://mlflow:5000", "lm")
    t = resolved(TrackingConfig(), {"WANDB_PROJECT": "gpt", "WANDB_MODE": "offline"})
    assert (t.backend, t.project, t.mode) == ("wandb", "gpt", "offline")
    assert resolved(TrackingConfig(), {"WANDB_MODE": "disabled", "WANDB_PROJECT": "gpt"}).backend == "none"
    assert resolved(TrackingConfig(backend="none"), {"MLFLOW_TRACKING_URI": "http://x"}).backend == "none"
    assert resolved(TrackingConfig(uri="http://mine"), {"MLFLOW_TRACKING_URI": "http://env"}).uri == "http://mine"
    with pytest.raises(ConfigError, match="tracking.uri"):
        resolved(TrackingConfig(backend="mlflow"), {})
    with pytest.raises(ConfigError, match="tracking.mode"):
        resolved(TrackingConfig(backend="wandb"), {"WANDB_MODE": "disabled"})
    with pytest.raises(ConfigError, match="tracking.uri.*credentials"):
        load_config(GPTPretrainConfig, None, ["tracking.uri=https://me:s3cret@mlflow.example.com"])


def _gpt(small_text, storage, name, *overrides):
    text_cfg, _ = small_text
    return load_config(
        GPTPretrainConfig,
        REPO / "jobs" / "configs" / "gpt_tiny.yaml",
        [
            f"data.cache_dir={text_cfg.cache_dir}",
            f"data.max_chars={text_cfg.max_chars}",
            f"data.vocab_size={text_cfg.vocab_size}",
            "model.block_size=64",
            "train.micro_batch_size=8",
            "train.log_interval=1",
            "train.eval_interval=5",
            "train.warmup_steps=2",
            "train.eval_batches=2",
            "run.checkpoint_interval=5",
            f"run.storage_path={storage}",
            f"run.name={name}",
            *overrides,
        ],
    )


def _jsonl(run_dir):
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def _watch_then_stop(url, proc, experiment, seen):
    """Stop the tracking server once the run has logged a few metrics (a tracking server going away mid-run)."""
    from mlflow import MlflowClient

    client = MlflowClient(url)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            exp = client.get_experiment_by_name(experiment)
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs and len(client.get_metric_history(runs[0].info.run_id, "train/loss")) >= 3:
                seen["steps"] = len(client.get_metric_history(runs[0].info.run_id, "train/loss"))
                break
        except Exception:  # noqa: BLE001 - the server is still starting up
            pass
        time.sleep(0.2)
    proc.terminate()
    proc.wait(timeout=30)


def test_tracking_server_stopped_mid_run_never_fails_training(own_mlflow_server, small_text, tmp_path, caplog):
    from bigray.recipes.gpt import train_local

    url, proc = own_mlflow_server
    cfg = _gpt(
        small_text,
        tmp_path,
        "lost",
        "train.max_steps=25",
        "scaling.num_workers=1",
        "deepspeed.zero_stage=0",
        "tracking.backend=mlflow",
        f"tracking.uri={url}",
        "tracking.experiment=stopped",
    )
    seen: dict = {}
    watcher = threading.Thread(target=_watch_then_stop, args=(url, proc, "stopped", seen))
    watcher.start()
    with caplog.at_level(logging.WARNING, logger="bigray"):
        metrics, ctx = train_local(cfg, str(tmp_path / "lost"))
    watcher.join()
    assert seen["steps"] >= 3, "the run never reached the server"
    assert metrics["step"] == 25 and ctx.checkpoints[-1].name.endswith("25")  # training went on to the end
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.getMessage().startswith("tracking:")]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert url in warnings[0].getMessage() and "training goes on" in warnings[0].getMessage()
    assert "lost" in json.loads((tmp_path / "lost" / TRACKING).read_text())  # the driver will not warn again


def wandb_records(path):
    """The records of a W&B run file (``run-<id>.wandb``), parsed with wandb's own protobuf schema.

    The file is W&B's LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks, each with a
    7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last).
    """
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += 32768 - pos % 32768
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(run_file):
    rows = []
    for r in wandb_records(run_file):
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


def test_wandb_offline_run_lives_in_the_run_directory_and_resumes(small_text, tmp_path):
    from bigray.recipes.gpt import train_local

    track = ["tracking.backend=wandb", "tracking.mode=offline", "tracking.project=bigray-test"]
    run_dir = tmp_path / "wb"
    train_local(
        _gpt(
            small_text, tmp_path, "wb", "train.max_steps=10", "scaling.num_workers=1", "deepspeed.zero_stage=0", *track
        ),
        str(run_dir),
    )
    run_id = json.loads((run_dir / TRACKING).read_text())["run_id"]
    train_local(
        _gpt(
            small_text, tmp_path, "wb", "train.max_steps=15", "scaling.num_workers=1", "deepspeed.zero_stage=0", *track
        ),
        str(run_dir),
    )
    assert json.loads((run_dir / TRACKING).read_text())["run_id"] == run_id
    runs = sorted(run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    # one offline run id, two attempts (wandb sync joins them)
    assert len(runs) == 2, sorted(str(p) for p in run_dir.rglob("*.wandb"))
    deadline = time.time() + 60  # W&B's service may still be writing the last run's records after finish() returns
    while time.time() < deadline and not all(
        any(r.WhichOneof("record_type") == "exit" for r in wandb_records(run)) for run in runs
    ):
        time.sleep(0.5)
    history = [row for run in runs for row in wandb_history(run)]
    rows = _jsonl(run_dir)
    assert [h["_step"] for h in history] == [r["step"] for r in rows] == list(range(1, 16))
    for h, r in zip(history, rows):
        assert h["train/loss"] == pytest.approx(r["train/loss"], rel=1e-6)
    records = list(wandb_records(runs[0]))
    first = next(r for r in records if r.WhichOneof("record_type") == "run").run
    config = {
        u.key: json.loads(u.value_json)
        for r in records
        if r.WhichOneof("record_type") in ("run", "config")
        for u in (r.run.config if r.WhichOneof("record_type") == "run" else r.config).update
    }
    assert first.run_id == run_id and first.project == "bigray-test" and first.display_name == "wb"
    assert config["train.max_steps"] == "10" and config["tag.device"] == "cpu"


def test_secrets_come_from_files_named_by_name_file(tmp_path):
    """A token in a mounted file (<NAME>_FILE) instead of the job's runtime_env; a set variable wins."""
    from bigray.cluster import read_secret_files
    from bigray.config import ConfigError

    (tmp_path / "token").write_text("tok-from-file\n")
    env = {"MLFLOW_TRACKING_TOKEN_FILE": str(tmp_path / "token"), "WANDB_API_KEY": "set", "WANDB_API_KEY_FILE": "x"}
    assert read_secret_files(env) == ["MLFLOW_TRACKING_TOKEN"]
    assert env["MLFLOW_TRACKING_TOKEN"] == "tok-from-file" and env["WANDB_API_KEY"] == "set"
    with pytest.raises(ConfigError, match="HF_TOKEN_FILE.*cannot read"):
        read_secret_files({"HF_TOKEN_FILE": str(tmp_path / "missing")})
