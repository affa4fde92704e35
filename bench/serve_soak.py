"""Serving soak: the Serve app (a tiny GPT and a ResNet-18) under 64 loopback clients for a few
minutes, 10% of the requests bad (an empty prompt, a negative seed, a temperature out of range, a
broken PNG, a decompression bomb).

Prints what every request got (good ones 200, or 429 with Retry-After by design when a queue fills;
bad ones a 4xx with an OpenAI error body; anything else is "unexpected"), and each replica's RSS
after a warm-up and at every third of the soak, with the ratio to the post-warm-up figure (the
baseline): a leak keeps growing through the thirds, allocator warm-up flattens after the first.
It was a 2-minute test in tests/test_serve.py; minutes of wall clock make it a benchmark.
All traffic stays on 127.0.0.1; every client loop ends at the deadline.

Run: python bench/serve_soak.py [SECONDS] [GPT_CKPT] [RESNET_CKPT]
     (without checkpoints it trains a tiny GPT and a ResNet-18 first, about a minute)
"""

from __future__ import annotations

import asyncio
import io
import random
import struct
import sys
import time
import zlib

import numpy as np
from common import CONFIGS, save_result, scratch
from PIL import Image

CLIENTS = 64
PORT = 8124


def _png(value: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((28, 28), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png() -> bytes:
    """A 28x28 PNG with a zTXt chunk that inflates to 20 MB (PIL: "Decompressed data too large")."""
    png = _png(0)
    data = b"k\x00\x00" + zlib.compress(b"a" * (20 << 20))
    chunk = struct.pack(">I", len(data)) + b"zTXt" + data + struct.pack(">I", zlib.crc32(b"zTXt" + data))
    return png[:33] + chunk + png[33:]  # after the IHDR chunk


BAD = [
    ({"prompt": ""}, None),
    ({"prompt": "hi", "seed": -3}, None),
    ({"prompt": "hi", "temperature": 9}, None),
    (None, b"\x89PNG\r\n\x1a\n broken"),
    (None, _bomb_png()),
]


def tiny_checkpoints() -> tuple[str, str]:
    """A tiny GPT (40 steps on 400k characters of Shakespeare) and a ResNet-18 (one epoch on 1,024
    Fashion-MNIST images), trained in this process: what the test session's fixtures train."""
    from bigray.config import GPTPretrainConfig, ResNetJobConfig, load_config
    from bigray.recipes.gpt import train_local as train_gpt
    from bigray.recipes.resnet import train_local as train_resnet

    root = scratch("soak")
    gpt = load_config(
        GPTPretrainConfig,
        CONFIGS / "gpt_tiny.yaml",
        [
            f"data.cache_dir={root}/data",
            "data.max_chars=400000",
            "data.vocab_size=512",
            "model.block_size=64",
            "train.micro_batch_size=8",
            "train.max_steps=40",
            "train.lr=3e-3",
            "train.warmup_steps=5",
            "train.eval_interval=40",
            "train.eval_batches=2",
            "run.checkpoint_interval=40",
            "scaling.num_workers=1",
            "scaling.cpus_per_worker=2",
        ],
    )
    _, gpt_ctx = train_gpt(gpt, str(root / "gpt"))
    resnet = load_config(
        ResNetJobConfig,
        CONFIGS / "resnet_fashion.yaml",
        [
            "data.max_train_samples=1024",
            "data.max_eval_samples=256",
            "train.epochs=1",
            "train.batch_size=32",
            "train.lr=0.2",
            "train.precision=bf16",
            "scaling.num_workers=1",
            "scaling.cpus_per_worker=2",
        ],
    )
    _, resnet_ctx = train_resnet(resnet, str(root / "resnet"))
    return str(gpt_ctx.checkpoints[-1]), str(resnet_ctx.checkpoints[-1])


def replica_rss() -> dict[str, int]:
    import psutil
    from ray.util.state import list_actors

    actors = [
        a for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.class_name.startswith("ServeReplica:soak:")
    ]
    return {f"{a.class_name.split(':')[-1]}:{a.pid}": psutil.Process(a.pid).memory_info().rss for a in actors}


async def client(session, url: str, rng: random.Random, until: float, tally: dict[str, int]) -> None:
    import aiohttp

    image = _png()
    while time.monotonic() < until:
        kind = rng.choices(["completion", "stream", "classify", "bad"], [4, 2, 3, 1])[0]
        status = "error"
        try:
            if kind == "bad":
                body, raw = rng.choice(BAD)
                kwargs = {"json": body} if body is not None else {"data": raw, "headers": {"content-type": "image/png"}}
                async with session.post(f"{url}/v1/{'completions' if body is not None else 'classify'}", **kwargs) as r:
                    status = r.status
                    ok = 400 <= r.status < 500 and r.status != 429 and "error" in await r.json()
            elif kind == "classify":
                async with session.post(f"{url}/v1/classify", data=image, headers={"content-type": "image/png"}) as r:
                    status = r.status
                    ok = (r.status == 200 and "predictions" in await r.json()) or (
                        r.status == 429 and "retry-after" in r.headers
                    )
            else:
                body = {
                    "prompt": rng.choice(["ROMEO:", "KING:", "To be"]),
                    "max_tokens": rng.randint(2, 12),
                    "seed": rng.randint(0, 99),
                    "stream": kind == "stream",
                }
                async with session.post(f"{url}/v1/completions", json=body) as r:
                    status, text = r.status, await r.text()
                    done = text.rstrip().endswith("data: [DONE]") if kind == "stream" else '"choices"' in text
                    ok = (r.status == 200 and done) or (r.status == 429 and "retry-after" in r.headers)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            ok, status = False, type(e).__name__
        key = kind if ok else f"unexpected {kind} {status}"
        tally[key] = tally.get(key, 0) + 1


async def soak(url: str, seconds: float, seed: int) -> dict[str, int]:
    import aiohttp

    tally: dict[str, int] = {}
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CLIENTS), timeout=timeout) as session:
        until = time.monotonic() + seconds
        await asyncio.gather(
            *(client(session, url, random.Random(seed * 1000 + i), until, tally) for i in range(CLIENTS))
        )
    return tally


def main(seconds: str = "120", gpt: str = "", resnet: str = "") -> dict:
    import ray
    from ray import serve

    from bigray.serve.launch import deploy
    from bigray.serve.settings import AppArgs

    if not (gpt and resnet):
        gpt, resnet = tiny_checkpoints()
    ray.init(num_cpus=4, include_dashboard=True)
    try:
        args = AppArgs(
            gpt_checkpoint=gpt,
            resnet_checkpoint=resnet,
            max_tokens_limit=64,
            max_prompt_tokens=48,
            max_image_bytes=200_000,
            max_image_pixels=1_000_000,
        )
        url = deploy(args, port=PORT, name="soak", access_log=False)
        asyncio.run(soak(url, 10, seed=0))  # warm-up: caches, batch shapes, allocator pools
        rss = [replica_rss()]
        tally: dict[str, int] = {}
        for third in range(3):
            for k, v in asyncio.run(soak(url, float(seconds) / 3, seed=third + 1)).items():
                tally[k] = tally.get(k, 0) + v
            rss.append(replica_rss())
        serve.delete("soak")
    finally:
        ray.shutdown()
    replicas = {
        name: {
            "rss_mb": [round(r[name] / 2**20) for r in rss if name in r],
            "ratio_to_warm": round(rss[-1].get(name, 0) / before, 3),
        }
        for name, before in rss[0].items()
    }
    result = {
        "benchmark": "serve_soak",
        "seconds": float(seconds),
        "clients": CLIENTS,
        "tally": tally,
        "unexpected": sum(v for k, v in tally.items() if k.startswith("unexpected")),
        "requests_per_s": round(sum(tally.values()) / float(seconds), 1),
        "replicas": replicas,
    }
    save_result("serve_soak", result)
    return result


if __name__ == "__main__":
    main(*sys.argv[1:])
