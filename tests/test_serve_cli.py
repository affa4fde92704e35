"""The two ways users start serving: `serve run serve/config.yaml` and `bigray serve`, as real processes
against the session's Ray, answered over real HTTP, then stopped with Ctrl-C."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PORT = 8123  # the Serve HTTP port of this test session (tests/test_serve.py)
URL = f"http://127.0.0.1:{PORT}"


def _env(ray_cluster):
    return {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}


def _wait_ready(proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the server process exited early"
        try:
            if requests.get(f"{URL}/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or the proxy still starting the app
            pass
        time.sleep(1)
    raise TimeoutError("the app never became ready")


def _stop(proc):
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_serve_run_config_yaml_with_a_storage_uri(ray_cluster, gpt_checkpoint, resnet_checkpoint, tmp_path):
    """serve/config.yaml as shipped, pointed at test checkpoints; the GPT one given as a file:// URI
    (the storage-URI path, the same pyarrow copy as s3://)."""
    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": PORT}
    app = config["applications"][0]
    app["args"]["gpt_checkpoint"] = Path(gpt_checkpoint[-1]).as_uri()
    app["args"]["resnet_checkpoint"] = str(resnet_checkpoint)
    for model in ("gpt", "resnet"):
        app["args"][model].update(min_replicas=1, max_replicas=1)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    with open(tmp_path / "serve-run.log", "w") as sink:
        proc = subprocess.Popen(["serve", "run", str(path)], env=_env(ray_cluster), stdout=sink, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        _wait_ready(proc)
        models = requests.get(f"{URL}/v1/models", timeout=30).json()
        assert {m["id"] for m in models["data"]} >= {"bigray-gpt", "bigray-resnet"}, models
        r = requests.post(f"{URL}/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 5, "seed": 1}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
    finally:
        _stop(proc)
    assert proc.returncode is not None


def test_bigray_serve_runs_until_interrupted(ray_cluster, gpt_checkpoint, tmp_path):
    """`bigray serve --gpt CKPT --port P`: ResNet left out, answers, stops cleanly on Ctrl-C."""
    cmd = [sys.executable, "-m", "bigray.cli", "serve", "--gpt", str(gpt_checkpoint[-1]), "--port", str(PORT)]
    log = tmp_path / "serve.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, env=_env(ray_cluster), stdout=sink, stderr=subprocess.STDOUT, text=True)
    banner = f"bigray is serving at http://127.0.0.1:{PORT}"
    try:
        deadline = time.time() + 180
        while banner not in log.read_text() and time.time() < deadline:  # printed once the deploy returned
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(1)
        assert banner in log.read_text()
        r = requests.post(f"{URL}/v1/completions", json={"prompt": "KING:", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200, r.text
        r = requests.post(f"{URL}/v1/classify", data=b"\x89PNG", headers={"Content-Type": "image/png"}, timeout=30)
        assert r.status_code == 404 and "no image classifier is served" in r.json()["error"]["message"], r.text
    finally:
        _stop(proc)
    assert proc.returncode == 0, log.read_text()[-3000:]
