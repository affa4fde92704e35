"""`ray job submit` against a running Ray head: the jobs/ entry points work as submitted jobs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_a_submitted_job_joins_the_cluster_names_secrets_in_its_runtime_env_and_its_missing_data(ray_cluster, tmp_path):
    """jobs/pretrain_gpt.py as a submitted job (its working directory uploaded): it joins the running
    cluster, warns about a secret passed in its runtime_env (naming it, never printing it), and is
    refused on the driver, naming the text file that is not there, before any worker starts. A
    submitted pretraining that trains is README's cluster rehearsal (tests/test_rehearsal.py)."""
    import ray

    dashboard = "http://" + ray._private.worker.global_worker.node.address_info["webui_url"]
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # Ray 2.60 local heads require the token
    runtime_env = {
        "excludes": [".git", ".venv", "runs", "data", ".cache", "bench/out"],
        # a secret where it does not belong: the job warns, naming it, and never prints it
        "env_vars": {"WANDB_API_KEY": "not-a-real-key-6a1f", "WANDB_MODE": "disabled"},
    }
    missing = tmp_path / "no-such-corpus.txt"
    cmd = [
        *(str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", dashboard),
        *("--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--"),
        *("python", "jobs/pretrain_gpt.py", "--config", "jobs/configs/gpt_tiny.yaml"),
        *("--set", "data.source=files", "--set", f"data.text_files=[{missing}]"),
        *("--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", f"run.storage_path={tmp_path}"),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    logs = out.stdout + out.stderr
    assert out.returncode != 0 and f"{missing} does not exist" in logs, logs[-3000:]
    assert "WANDB_API_KEY in the job's runtime_env" in logs and "not-a-real-key-6a1f" not in logs, logs[-3000:]
    assert not (tmp_path / "gpt-tiny").exists()  # no run was started


def test_submitted_job_with_bad_config_fails_with_the_message(ray_cluster, tmp_path):
    import ray

    dashboard = "http://" + ray._private.worker.global_worker.node.address_info["webui_url"]
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        "--address",
        dashboard,
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps({"excludes": [".git", ".venv", "runs", "data", ".cache"]}),
        "--",
        "python",
        "jobs/train_resnet.py",
        "--set",
        "train.batch_size=-1",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode != 0
    assert "train.batch_size" in out.stdout + out.stderr
