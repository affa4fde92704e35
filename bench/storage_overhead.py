"""Storage overhead: GPT tiny training with run.storage_path on an S3 API (moto's server on
127.0.0.1, started here) vs a local directory: same run length and checkpoint interval, after one
warm-up run, interleaved local, s3, local, s3 in this process. Prints the tokens/s ratio (median per-step, and end to end
including checkpoint uploads and metric uploads). Target >= 0.95.
Run: python bench/storage_overhead.py   (needs the dev extras: moto[server], boto3)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from common import CONFIGS, save_result, scratch


def start_s3() -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the S3 server did not start")


def main(steps: int = 60, interval: int = 20) -> dict:
    s3 = start_s3()  # before Ray starts, so its workers see AWS_ENDPOINT_URL
    try:
        import boto3
        import ray

        from bigray.artifacts.runs import read_metrics
        from bigray.config import GPTPretrainConfig, load_config
        from bigray.recipes.gpt import pretrain

        boto3.client("s3").create_bucket(Bucket="bench")
        tmp = scratch("storage")
        ray.init(num_cpus=2)
        runs: dict[str, list[dict]] = {"local": [], "s3": []}
        # A warm-up run first (DeepSpeed's op build, page cache), then the two interleaved, twice.
        for i, (where, storage) in enumerate(
            [("warmup", str(tmp))] + [("local", str(tmp)), ("s3", "s3://bench/runs")] * 2
        ):
            cfg = load_config(
                GPTPretrainConfig,
                CONFIGS / "gpt_tiny.yaml",
                [
                    "scaling.num_workers=2",
                    "scaling.cpus_per_worker=1",
                    f"train.max_steps={steps if i else 10}",
                    "train.log_interval=5",
                    f"train.eval_interval={interval}",
                    f"run.checkpoint_interval={interval}",
                    "train.eval_batches=2",
                    f"run.storage_path={storage}",
                    f"run.name=gpt-{where}-{i}",
                ],
            )
            t0 = time.time()
            summary = pretrain(cfg)
            wall = time.time() - t0
            if where == "warmup":
                continue
            rows = read_metrics(summary["run_dir"])
            per_step = sorted(r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r)[1:]
            tokens = (
                steps
                * cfg.train.micro_batch_size
                * cfg.train.grad_accum_steps
                * cfg.model.block_size
                * cfg.scaling.num_workers
            )
            runs[where].append(
                {
                    "median_tokens_per_s": round(per_step[len(per_step) // 2], 1),
                    "end_to_end_tokens_per_s": round(tokens / wall, 1),
                    "wall_s": round(wall, 1),
                }
            )
        ray.shutdown()
    finally:
        s3.terminate()

    def mean(where: str, key: str) -> float:
        return sum(r[key] for r in runs[where]) / len(runs[where])

    result = {
        "benchmark": "storage_overhead",
        "steps": steps,
        "checkpoint_interval": interval,
        **runs,
        "ratio_median_step": round(mean("s3", "median_tokens_per_s") / mean("local", "median_tokens_per_s"), 3),
        "ratio_end_to_end": round(mean("s3", "end_to_end_tokens_per_s") / mean("local", "end_to_end_tokens_per_s"), 3),
    }
    save_result("storage_overhead", result)
    return result


if __name__ == "__main__":
    main()
