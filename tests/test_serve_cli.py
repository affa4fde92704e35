"""The ways users start serving: `serve run serve/config.yaml` and `bigray serve` as real processes
against the session's Ray, stopped with Ctrl-C, and `serve deploy serve/config.yaml` through the
dashboard's REST API; all answered over real HTTP."""

import os
import signal
import subprocess
import sys
import threading
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


def _config(gpt: str, resnet: str, **app_fields) -> dict:
    """serve/config.yaml as shipped, on this session's Serve port, one replica per model."""
    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": PORT}
    app = config["applications"][0]
    app.update(app_fields)
    app["args"]["gpt_checkpoint"], app["args"]["resnet_checkpoint"] = gpt, resnet
    for model in ("gpt", "resnet"):
        app["args"][model].update(min_replicas=1, max_replicas=1)
    return config


def test_serve_run_config_yaml_with_a_storage_uri(ray_cluster, gpt_checkpoint, resnet_checkpoint, tmp_path):
    """serve/config.yaml as shipped, pointed at test checkpoints; the GPT one given as a file:// URI
    (the storage-URI path, the same pyarrow copy as s3://)."""
    config = _config(Path(gpt_checkpoint[-1]).as_uri(), str(resnet_checkpoint))
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    with open(tmp_path / "serve-run.log", "w") as sink:
        proc = subprocess.Popen(
            ["serve", "run", str(path)], env=_env(ray_cluster), stdout=sink, stderr=subprocess.STDOUT, cwd=tmp_path
        )
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


def test_serve_deploy_then_redeploy_a_new_checkpoint_drops_no_request(
    ray_cluster, gpt_checkpoint, resnet_checkpoint, tmp_path
):
    """`serve deploy serve/config.yaml` to the running cluster; deploying it again with another GPT
    checkpoint in the deployment's user_config swaps the model in place while requests keep being
    answered; deploying an incomplete checkpoint then is refused by the replica, which keeps the old
    model answering."""
    import ray

    dashboard = "http://" + ray._private.worker.global_worker.node.address_info["webui_url"]
    base = f"{URL}/deployed"
    path = tmp_path / "serve.yaml"

    def deploy(gpt):
        """The app's args stay those of the first deploy; a swap changes only the gpt deployment's
        user_config (a lightweight update: Serve reconfigures the running replica in place)."""
        config = _config(str(gpt_checkpoint[-1]), str(resnet_checkpoint), name="deployed", route_prefix="/deployed")
        config["applications"][0]["deployments"] = [{"name": "gpt", "user_config": {"checkpoint": str(gpt)}}]
        path.write_text(yaml.safe_dump(config))
        out = subprocess.run(
            ["serve", "deploy", str(path), "--address", dashboard],
            env=_env(ray_cluster),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stdout + out.stderr

    def serving(checkpoint, timeout=180):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                r = requests.get(f"{base}/v1/status", timeout=30)
                if r.status_code == 200 and checkpoint.name in r.json()["models"]["gpt"]["checkpoint"]:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"{checkpoint.name} never served")

    import shutil

    broken = Path(shutil.copytree(gpt_checkpoint[-1], tmp_path / "broken" / gpt_checkpoint[-1].name))
    (broken / "ranks" / "rank_0.json").unlink()  # rank 0 never finished writing
    deploy(gpt_checkpoint[-1])
    stop, codes = threading.Event(), []

    def hammer():  # a connection error is a dropped request too: record it, don't let the thread die
        while not stop.is_set():
            try:
                r = requests.post(
                    f"{base}/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 2, "temperature": 0}, timeout=60
                )
                codes.append(r.status_code)
            except requests.RequestException as e:
                codes.append(repr(e))

    threads = [threading.Thread(target=hammer, daemon=True) for _ in range(3)]
    try:
        serving(gpt_checkpoint[-1])
        for t in threads:
            t.start()
        time.sleep(2)
        deploy(gpt_checkpoint[0])  # the step-20 checkpoint
        serving(gpt_checkpoint[0])
        time.sleep(2)
        swapped = len(codes)
        deploy(broken)  # a swap to an incomplete checkpoint: refused, the step-20 model keeps serving
        refused, deadline = None, time.time() + 120
        while refused is None and time.time() < deadline:
            refused = (
                requests.get(f"{base}/v1/status", timeout=30).json().get("models", {}).get("gpt", {}).get("refused")
            )
            time.sleep(1)
        time.sleep(2)
        stop.set()
        for t in threads:
            t.join()
        assert len(codes) > 10 and all(c == 200 for c in codes), codes
        assert len(codes) > swapped + 3, "no request was answered during the refused swap"
        assert (
            refused and refused["checkpoint"] == str(broken) and "rank 0 never finished writing" in refused["reason"]
        ), refused
        serving(gpt_checkpoint[0], timeout=5)
    finally:  # through the REST API too: `serve run` above shut down the Serve this process knew
        stop.set()
        subprocess.run(
            ["serve", "shutdown", "-y", "--address", dashboard], env=_env(ray_cluster), timeout=120, check=True
        )


def test_an_export_is_what_ray_serve_llm_and_vllm_load(gpt_checkpoint, tmp_path):
    """serve/llm-config.yaml passes Ray Serve LLM's own config model (LLMConfig; vLLM itself is not
    installed here), and bigray's export is a directory vLLM's GPT-2 loader reads."""
    import json

    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    from bigray.artifacts.hf_gpt import vllm_problems
    from bigray.config import GPTPretrainConfig, load_config
    from bigray.export import export_gpt

    out = tmp_path / "hf"
    export_gpt(str(gpt_checkpoint[-1]), str(out))
    assert vllm_problems(out) == []
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(
        json.dumps({**config, "scale_attn_by_inverse_layer_idx": True, "n_embd": config["n_embd"] * 2})
    )
    problems = vllm_problems(out)
    assert any("scale_attn_by_inverse_layer_idx" in p for p in problems)
    assert any(p.startswith("weight h.0.attn.c_attn.weight: shape") for p in problems), problems

    app = yaml.safe_load((REPO / "serve" / "llm-config.yaml").read_text())["applications"][0]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    preset = load_config(GPTPretrainConfig, REPO / "jobs" / "configs" / "gpt_124m.yaml")
    for raw in app["args"]["llm_configs"]:
        llm = LLMConfig(**raw)  # unknown or mistyped keys raise
        assert llm.model_loading_config.model_source.bucket_uri.startswith("s3://")
        assert llm.engine_kwargs["max_model_len"] <= preset.model.block_size  # the model's n_positions
