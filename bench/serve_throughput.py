"""Serving throughput, measured side by side in one run.

Classification: requests/s and p50/p99 latency at concurrency 1, 8 and 32 for (a) the Serve app
with @serve.batch, (b) the same app with max_batch_size=1 (unbatched) and (c) a plain FastAPI +
uvicorn process holding the same model; all three with float32 weights, then with bfloat16
weights; at concurrency 32 also the CPU each process spent per request. Generation: tokens/s for
3 rounds of 8 concurrent completions through the Serve app vs answering them one by one with
transformers' generate in this process.
All traffic stays on 127.0.0.1; every load loop is bounded by a request count.

Run: python bench/serve_throughput.py [GPT_DIR] [RESNET_CKPT]   (defaults: make quickstart's outputs)
"""

from __future__ import annotations

import asyncio
import io
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
from common import REPO, save_result, scratch
from PIL import Image

REQUESTS_PER_LEVEL = {1: 60, 8: 240, 32: 640}
PLAIN_PORT = 8210


async def _load(url: str, body: bytes, concurrency: int, total: int) -> dict:
    """`total` POSTs from `concurrency` closed-loop clients; aiohttp, the lightest client at hand, so the
    load generator takes as little as possible of the two cores it shares with the servers."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    remaining = total

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors, remaining
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            async with session.post(url, data=body, headers={"content-type": "image/png"}) as r:
                await r.read()
                errors += r.status != 200
            latencies.append(time.perf_counter() - t0)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "rps": round(total / wall, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
        "errors": errors,
    }


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _cpu_seconds() -> dict[str, float]:
    """CPU time so far of every process on this machine, keyed by role: Serve's proxy, each deployment's
    replicas (by deployment name), the plain server, the rest of Ray, and this load generator."""
    import psutil

    roles: dict[str, float] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd, t = " ".join(p.info["cmdline"] or []), p.cpu_times()
        except psutil.Error:
            continue
        if "ProxyActor" in cmd:
            role = "proxy"
        elif "ServeReplica:" in cmd:
            role = cmd.split("ServeReplica:")[1].split(":")[1].split()[0]  # ServeReplica:<app>:<deployment>
        elif "plain_app.py" in cmd:
            role = "plain_server"
        elif p.pid == os.getpid():
            role = "load_generator"
        elif "ray" in cmd:
            role = "ray_other"
        else:
            continue
        roles[role] = roles.get(role, 0.0) + t.user + t.system
    return roles


def _sweep(url: str) -> dict:
    """Every concurrency level; at the top level also the CPU milliseconds each role spent per request."""
    body = _png()
    asyncio.run(_load(url, body, 4, 20))  # warm-up
    out: dict = {}
    for c, n in REQUESTS_PER_LEVEL.items():
        before = _cpu_seconds()
        out[c] = asyncio.run(_load(url, body, c, n))
        if c == 32:
            spent = {k: v - before.get(k, 0.0) for k, v in sorted(_cpu_seconds().items())}
            out["cpu_ms_per_request_at_32"] = {k: round(1000 * v / n, 2) for k, v in spent.items() if v > 0}
    return out


PLAIN_APP = textwrap.dedent(
    """
    import sys, torch
    from fastapi import FastAPI, Request
    from bigray.serve.runners import ClassifierRunner
    torch.set_num_threads(1)
    runner = ClassifierRunner(sys.argv[1], dtype=sys.argv[3])
    app = FastAPI()

    @app.post("/v1/classify")
    async def classify(request: Request):
        probs = runner.classify(runner.preprocess(await request.body())[None])[0]
        return {"index": int(probs.argmax())}

    if __name__ == "__main__":
        import uvicorn
        uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
    """
)


def classification(resnet: str, dtype: str) -> dict:
    import requests
    from ray import serve

    from bigray.serve.launch import deploy
    from bigray.serve.settings import AppArgs, DeploymentArgs

    results = {}
    for name, batch in (("serve_batched", 32), ("serve_unbatched", 1)):
        args = AppArgs(
            resnet_checkpoint=resnet,
            resnet=DeploymentArgs(
                min_replicas=1,
                max_replicas=1,
                max_batch_size=batch,
                max_ongoing_requests=64,
                batch_wait_timeout_s=0.005,
                dtype=dtype,
            ),
        )
        url = deploy(args, port=8000, name=name, access_log=False)  # uvicorn below logs no requests either
        results[name] = _sweep(f"{url}/v1/classify")
        serve.delete(name)
    script = scratch("plain") / "plain_app.py"
    script.write_text(PLAIN_APP)
    proc = subprocess.Popen(
        [sys.executable, str(script), resnet, str(PLAIN_PORT), dtype], env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    try:
        for _ in range(120):
            try:
                requests.post(f"http://127.0.0.1:{PLAIN_PORT}/v1/classify", data=_png(), timeout=2)
                break
            except requests.ConnectionError:
                time.sleep(0.5)
        results["plain_fastapi_uvicorn"] = _sweep(f"http://127.0.0.1:{PLAIN_PORT}/v1/classify")
    finally:
        proc.terminate()
        proc.wait()
    results["batched_over_unbatched_rps_at_32"] = round(
        results["serve_batched"][32]["rps"] / results["serve_unbatched"][32]["rps"], 2
    )
    return results


def generation(gpt_dir: str, n: int = 8, max_tokens: int = 32, rounds: int = 3) -> dict:
    """`rounds` rounds of n concurrent completions through Serve, vs the same prompts one by one."""
    import torch
    from ray import serve

    from bigray.serve.launch import deploy
    from bigray.serve.settings import AppArgs, DeploymentArgs

    prompts = [
        f"{name}:\n" for name in ("ROMEO", "JULIET", "HAMLET", "KING LEAR", "OTHELLO", "MACBETH", "PORTIA", "VIOLA")
    ][:n]
    url = deploy(
        AppArgs(
            gpt_checkpoint=gpt_dir, gpt=DeploymentArgs(max_replicas=1, max_batch_size=n, batch_wait_timeout_s=0.05)
        ),
        port=8000,
        name="gen",
        access_log=False,
    )

    async def one(client, prompt):
        r = await client.post(
            f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        )
        return r.json()["usage"]["completion_tokens"]

    async def all_at_once():
        import httpx

        async with httpx.AsyncClient(timeout=300) as client:
            await one(client, "warm up")
            t0, tokens = time.perf_counter(), 0
            for _ in range(rounds):
                tokens += sum(await asyncio.gather(*(one(client, p) for p in prompts)))
            return tokens, time.perf_counter() - t0

    served_tokens, served_s = asyncio.run(all_at_once())
    serve.delete("gen")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(gpt_dir)
    model = AutoModelForCausalLM.from_pretrained(gpt_dir).eval()
    t0, seq_tokens = time.perf_counter(), 0
    with torch.no_grad():
        for p in prompts * rounds:
            ids = tok(p, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
            seq_tokens += out.shape[1] - ids.shape[1]
    seq_s = time.perf_counter() - t0
    return {
        "requests": n,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "serve_batched_tokens_per_s": round(served_tokens / served_s, 1),
        "sequential_generate_tokens_per_s": round(seq_tokens / seq_s, 1),
        "ratio": round((served_tokens / served_s) / (seq_tokens / seq_s), 2),
    }


def main(gpt_dir: str = "runs/quickstart/gpt-hf", resnet: str = "runs/quickstart/resnet") -> dict:
    import ray

    from bigray.artifacts.locate import resolve_checkpoint, servable

    gpt_dir, resnet = str(Path(gpt_dir).resolve()), servable(resolve_checkpoint(resnet), "resnet")
    ray.init(num_cpus=2, include_dashboard=True)
    try:
        result = {
            "benchmark": "serve_throughput",
            "classification": {dtype: classification(resnet, dtype) for dtype in ("float32", "bfloat16")},
            "generation": generation(gpt_dir),
        }
    finally:
        ray.shutdown()
    save_result("serve_throughput", result)
    return result


if __name__ == "__main__":
    main(*sys.argv[1:])
