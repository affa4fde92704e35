"""`ray job submit` against a running Ray head: the jobs/ entry points work as submitted jobs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_ray_job_submit_runs_gpt_pretraining(ray_cluster, small_text, tmp_path):
    import ray

    text_cfg, _ = small_text
    dashboard = "http://" + ray._private.worker.global_worker.node.address_info["webui_url"]
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # Ray 2.60 local heads require the token
    cmd = [
        ray_bin,
        "job",
        "submit",
        "--address",
        dashboard,
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps(
            {
                "excludes": [".git", ".venv", "runs", "data", ".cache", "bench/out"],
                # a secret where it does not belong: the job warns, naming it, and never prints it
                "env_vars": {"WANDB_API_KEY": "not-a-real-key-6a1f", "WANDB_MODE": "disabled"},
            }
        ),
        "--",
        "python",
        "jobs/pretrain_gpt.py",
        "--config",
        "jobs/configs/gpt_tiny.yaml",
        "--set",
        f"data.cache_dir={text_cfg.cache_dir}",
        "--set",
        f"data.max_chars={text_cfg.max_chars}",
        "--set",
        f"data.vocab_size={text_cfg.vocab_size}",
        "--set",
        "model.block_size=64",
        "--set",
        "train.micro_batch_size=4",
        "--set",
        "train.max_steps=6",
        "--set",
        "train.eval_interval=6",
        "--set",
        "run.checkpoint_interval=6",
        "--set",
        f"run.storage_path={tmp_path}",
        "--set",
        "run.name=submitted",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in (out.stdout + out.stderr).lower()
    assert "WANDB_API_KEY in the job's runtime_env" in out.stdout + out.stderr
    assert "not-a-real-key-6a1f" not in out.stdout + out.stderr
    json_lines = [line for line in out.stdout.splitlines() if line.startswith('{"run_dir"')]
    assert json_lines, out.stdout[-2000:]
    summary = json.loads(json_lines[-1])
    assert summary["run_dir"] == str(tmp_path / "submitted")
    assert summary["metrics"]["step"] == 6 and Path(summary["checkpoint"]).is_dir()


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
