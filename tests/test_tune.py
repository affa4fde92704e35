"""Ray Tune searches over the real trainers on the shared local Ray cluster (tiny models)."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bigray.config import TuneJobConfig, load_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def gpt_search(small_text, tmp_path, name, *overrides):
    text_cfg, _ = small_text
    return load_config(
        TuneJobConfig,
        REPO / "jobs" / "configs" / "tune_gpt.yaml",
        [
            "tune.searcher=random",
            "tune.max_concurrent_trials=1",
            f"trainer.data.cache_dir={text_cfg.cache_dir}",
            f"trainer.data.max_chars={text_cfg.max_chars}",
            f"trainer.data.vocab_size={text_cfg.vocab_size}",
            "trainer.train.max_steps=20",
            "trainer.train.eval_interval=5",
            "trainer.run.checkpoint_interval=5",
            f"run.storage_path={tmp_path}",
            f"run.name={name}",
            *overrides,
        ],
    )


def read_table(run_dir):
    with open(Path(run_dir, "results.csv")) as f:
        return list(csv.DictReader(f))


def test_asha_search_stops_bad_trials_and_reports_the_best(ray_cluster, small_text, tmp_path):
    from bigray.tune import run_search

    # Best learning rate first: run one at a time, ASHA must stop the worse one at a rung.
    job = gpt_search(
        small_text, tmp_path, "asha", "tune.num_samples=1", "tune.space={train.lr: {grid: [0.006, 0.00005]}}"
    )
    summary = run_search(job)
    rows = read_table(summary["run_dir"])
    assert [r["status"] for r in rows] == ["completed", "stopped early"], rows
    best_row = min(rows, key=lambda r: float(r["best val/loss"]))
    assert summary["metrics"]["val/loss"] == pytest.approx(float(best_row["best val/loss"]))
    assert summary["best_trial"] == best_row["trial_id"]
    assert json.loads(best_row["config"])["train.lr"] == summary["best_config"]["train"]["lr"]
    # the best checkpoint is a complete GPT checkpoint that export accepts straight from summary.json
    from bigray.export import export_gpt

    info = export_gpt(str(Path(summary["run_dir"]) / "summary.json"), str(tmp_path / "best-hf"))
    assert info["checkpoint"] == summary["checkpoint"]
    assert (tmp_path / "best-hf" / "model.safetensors").is_file()
    _assert_planted_state_is_refused(summary["run_dir"], tmp_path)  # a search in a local directory


def test_diverging_trial_fails_while_others_complete(ray_cluster, tmp_path):
    """Trials on a worker range (elastic: retried without limit when a node goes), where a divergence
    still ends its trial at once."""
    from bigray.tune import run_search

    job = load_config(
        TuneJobConfig,
        REPO / "jobs" / "configs" / "tune_resnet.yaml",
        [
            "tune.num_samples=1",
            "tune.scheduler=fifo",
            "tune.max_concurrent_trials=2",
            "tune.space={train.lr: {grid: [0.05, 100000.0]}}",
            "trainer.data.max_train_samples=256",
            "trainer.data.max_eval_samples=128",
            "trainer.train.epochs=1",
            "trainer.train.batch_size=0",
            "trainer.train.global_batch_size=32",
            "trainer.scaling.num_workers=1..2",
            "trainer.train.schedule=cosine",
            "trainer.train.warmup_epochs=0",
            f"run.storage_path={tmp_path}",
            "run.name=diverge",
        ],
    )
    summary = run_search(job)
    rows = {json.loads(r["config"])["train.lr"]: r for r in read_table(summary["run_dir"])}
    assert rows[100000.0]["status"] == "failed" and "diverged" in rows[100000.0]["error"]
    assert rows[0.05]["status"] == "completed"
    assert summary["best_config"]["train"]["lr"] == 0.05


def test_interrupted_search_in_a_bucket_resumes_without_rerunning_finished_trials(
    ray_cluster, s3_server, small_text, mlflow_server, tmp_path
):
    """A 2-trial search (one at a time) whose storage is a bucket (the real S3 API), interrupted (SIGINT,
    as Ctrl-C) after its first trial finished, resumed with ``bigray tune --resume s3://...``. Also tracked in
    MLflow: one parent run for the search (continued by the resume), one child per trial."""
    import boto3

    from bigray.artifacts.checkpoint import read_meta
    from bigray.artifacts.storage import file_sizes, read_text, subdirs
    from bigray.tune import run_search

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="tune-e2e")
    search = "s3://tune-e2e/searches/resume"
    text_cfg, _ = small_text
    overrides = [
        f"{k}={v}"
        for k, v in [
            ("tune.searcher", "random"),
            ("tune.max_concurrent_trials", 1),
            ("tune.num_samples", 1),
            ("tune.scheduler", "fifo"),
            ("tune.space", "{train.lr: {grid: [0.003, 0.00005]}}"),
            ("trainer.data.cache_dir", text_cfg.cache_dir),
            ("trainer.data.max_chars", text_cfg.max_chars),
            ("trainer.data.vocab_size", text_cfg.vocab_size),
            ("trainer.train.max_steps", 20),
            ("trainer.train.eval_interval", 5),
            ("trainer.run.checkpoint_interval", 5),
            ("run.storage_path", "s3://tune-e2e/searches"),
            ("run.name", "resume"),
            ("tracking.backend", "mlflow"),
            ("tracking.uri", mlflow_server),
            ("tracking.experiment", "search-test"),
        ]
    ]
    cmd = [sys.executable, "-m", "bigray.cli", "tune", "--config", str(REPO / "jobs" / "configs" / "tune_gpt.yaml")]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}

    def trial_steps() -> dict[str, list[int]]:
        return {t.rsplit("/", 1)[-1]: _bucket_steps(t) for t in subdirs(f"{search}/trials")}

    log = tmp_path / "search.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while (
        time.time() < deadline and proc.poll() is None and not any(s and max(s) >= 20 for s in trial_steps().values())
    ):
        time.sleep(1)  # interrupt once the first trial finished
    finished_before = {name: steps for name, steps in trial_steps().items() if steps and max(steps) >= 20}
    assert finished_before, f"no trial finished before the interruption: {trial_steps()}\n{log.read_text()[-3000:]}"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    assert len(finished_before) < 2, "the search finished before it was interrupted"
    out = subprocess.run(
        [sys.executable, "-m", "bigray.cli", "tune", "--resume", search],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = list(csv.DictReader(io.StringIO(read_text(f"{search}/results.csv"))))
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows), rows
    after = trial_steps()
    for name, steps in finished_before.items():
        assert after[name] == steps  # finished trials were not run again
    summary = json.loads(read_text(f"{search}/summary.json"))
    assert summary["run_dir"] == search and summary["checkpoint"].startswith(f"{search}/trials/"), summary  # full URIs
    assert read_meta(summary["checkpoint"], "gpt").step == 20 and "tune_job.json" in file_sizes(search)
    _assert_tracked_search(mlflow_server, "search-test", rows, summary, [0.00005, 0.003])
    again = run_search(TuneJobConfig(), resume_dir=search)  # a finished search resumes to the same answer
    assert again["best_trial"] == summary["best_trial"] and again["checkpoint"] == summary["checkpoint"]
    _assert_planted_state_is_refused(search, tmp_path)  # and in a bucket


class _Planted:
    """What a writer of the search's directory could leave: a pickle that runs code when loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def _assert_planted_state_is_refused(search: str, tmp_path: Path) -> None:
    """`bigray tune --resume` checks every state file against the search's signed manifest first:
    a planted tuner.pkl or searcher state is refused and never unpickled."""
    import pickle

    from bigray.artifacts.storage import read_bytes, write_bytes
    from bigray.config import ConfigError
    from bigray.tune import run_search

    marker = tmp_path / "planted-pickle-ran"
    for name in ("tuner.pkl", "searcher-state-planted.pkl"):
        path = f"{search}/{name}"
        original = read_bytes(path) if name == "tuner.pkl" else None
        write_bytes(path, pickle.dumps(_Planted(str(marker))))
        with pytest.raises(ConfigError, match=f"{name} is not the file the search wrote"):
            run_search(TuneJobConfig(), resume_dir=search)
        assert not marker.exists()
        if original is None:
            from bigray.artifacts.storage import delete_file

            delete_file(path)
        else:
            write_bytes(path, original)


def _bucket_steps(trial_dir: str) -> list[int]:
    from bigray.artifacts.storage import is_file, read_text

    path = f"{trial_dir}/metrics.jsonl"
    return [json.loads(line)["step"] for line in read_text(path).splitlines()] if is_file(path) else []


def _assert_tracked_search(url, experiment, rows, summary, lrs):
    from mlflow import MlflowClient

    client = MlflowClient(url)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if r.data.tags.get("bigray.kind") == "search"]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == len(lrs) + 1 and len(children) == len(lrs), [
        (r.info.run_name, r.data.tags.get("mlflow.parentRunId")) for r in runs
    ]
    assert parent.info.status == "FINISHED" and parent.data.metrics["best/val/loss"] == pytest.approx(
        summary["metrics"]["val/loss"]
    )
    assert parent.data.tags["bigray.best_trial"] == summary["best_trial"]
    assert sorted(float(c.data.params["train.lr"]) for c in children) == lrs
    by_trial = {r["trial_id"]: r for r in rows}
    for child in children:
        row = by_trial[child.data.tags["bigray.trial_id"]]
        assert (
            child.info.status == "FINISHED"
            and float(child.data.params["train.lr"]) == json.loads(row["config"])["train.lr"]
        )
        assert child.data.metrics["best/val/loss"] == pytest.approx(float(row["best val/loss"]))
        assert child.data.tags["bigray.best_trial"] == str(row["trial_id"] == summary["best_trial"]).lower()


def _steps_list(trial_dir):
    path = trial_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def _steps(trial_dir):
    steps = _steps_list(trial_dir)
    return max(steps) if steps else 0


def test_pbt_copies_good_checkpoints_into_bad_trials(ray_cluster, small_text, tmp_path):
    from bigray.tune import run_search

    # Two trials at once, lr 2.6e-3 and 6.3e-5 (seed 9): the one behind at a perturbation (reports 2 and 4 of
    # 5, steps 10 and 20) takes the other's checkpoint and trains on from it (each exploit is a restart).
    job = gpt_search(
        small_text,
        tmp_path,
        "pbt",
        "tune.scheduler=pbt",
        "tune.num_samples=2",
        "tune.max_concurrent_trials=2",
        "tune.seed=9",
        "tune.space={train.lr: {loguniform: [0.00001, 0.006]}}",
        "tune.perturbation_interval=2",
        "trainer.train.max_steps=25",
    )
    summary = run_search(job)
    rows = read_table(summary["run_dir"])
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows), rows
    # An exploited trial continues in a run of its own from the donor's checkpoint, not from step 0.
    trials = Path(summary["run_dir"]) / "trials"
    restored = [d for d in trials.glob("trial_*-from-*") if _steps_list(d)]
    assert restored, sorted(p.name for p in trials.iterdir())
    assert all(_steps_list(d)[0] > 5 for d in restored)
    best_row = min(rows, key=lambda r: float(r["best val/loss"]))
    assert summary["metrics"]["val/loss"] == pytest.approx(float(best_row["best val/loss"]))
