"""Run by tests/test_cluster_wait.py in its own process: a Ray cluster on this machine
(ray.cluster_utils.Cluster) that starts with a 1-CPU head and grows by one 2-CPU node.

The node types an autoscaler would publish to the GCS are reported the way Ray's autoscaler
reports them (GcsClient.report_cluster_config); the node itself is really added. Prints one JSON
line with what each case did.

Usage: autoscaler_wait.py OUT_DIR CACHE_DIR MAX_CHARS VOCAB
"""

import json
import logging
import socket
import sys
import threading
import time
from pathlib import Path


def timed(fn):
    t0 = time.monotonic()
    try:
        fn()
        return {"ok": True, "seconds": round(time.monotonic() - t0, 1)}
    except Exception as e:  # noqa: BLE001 - the case reports what it raised
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "seconds": round(time.monotonic() - t0, 1)}


def main() -> None:
    out, cache, max_chars, vocab = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    import ray
    from ray.cluster_utils import Cluster
    from ray.core.generated import autoscaler_pb2

    from bigray.cluster import wait_for_workers
    from bigray.config import GPTPretrainConfig, ScalingConfig, TuneJobConfig, load_config
    from bigray.recipes.gpt import pretrain
    from bigray.tune import concurrent_trials

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logging.basicConfig(level=logging.INFO)
    logging.getLogger("bigray").addHandler(Keep())
    with socket.socket() as sock:  # the test session's own Ray already holds the default dashboard port
        sock.bind(("127.0.0.1", 0))
        dashboard_port = sock.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True, "dashboard_port": dashboard_port})
    ray.init(address=cluster.address)
    result: dict = {}
    two = ScalingConfig(num_workers=2, cpus_per_worker=1)
    result["fixed_cluster"] = timed(lambda: wait_for_workers(two))  # no autoscaler: refused at once

    config = autoscaler_pb2.ClusterConfig()
    for name, cpus, max_count in (("head", 1, 1), ("cpu-2", 2, 1)):
        group = autoscaler_pb2.NodeGroupConfig(name=name, max_count=max_count, min_count=1 if name == "head" else 0)
        group.resources["CPU"] = cpus
        config.node_group_configs.append(group)
    ray._raylet.GcsClient(address=cluster.address).report_cluster_config(config.SerializeToString())

    result["never_fits"] = timed(lambda: wait_for_workers(ScalingConfig(num_workers=2, cpus_per_worker=4)))
    job = TuneJobConfig()
    per_trial = lambda cpus: type("Trainer", (), {"scaling": ScalingConfig(num_workers=1, cpus_per_worker=cpus)})()  # noqa: E731
    result["trials"] = {"now_1cpu": int(ray.cluster_resources()["CPU"]), "at_most_1cpu": concurrent_trials(job, per_trial(1)),
                        "at_most_2cpu": concurrent_trials(job, per_trial(2))}  # fmt: skip
    result["timeout"] = timed(lambda: wait_for_workers(ScalingConfig(num_workers=3, cpus_per_worker=1, resource_wait_s=4)))

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(GPTPretrainConfig, repo / "jobs" / "configs" / "gpt_tiny.yaml", [
        f"data.cache_dir={cache}", f"data.max_chars={max_chars}", f"data.vocab_size={vocab}", "model.block_size=32",
        "train.micro_batch_size=4", "train.max_steps=2", "train.eval_interval=2", "train.eval_batches=1",
        "run.checkpoint_interval=2", "scaling.num_workers=2", "scaling.cpus_per_worker=1", "scaling.resource_wait_s=300",
        f"run.storage_path={out}", "run.name=grown",
    ])  # fmt: skip
    summary: dict = {}
    job_result: dict = {}
    started = time.monotonic()
    job = threading.Thread(target=lambda: job_result.update(timed(lambda: summary.update(pretrain(cfg)))))
    job.start()  # the job waits for a second node ...
    time.sleep(8)
    added_after = round(time.monotonic() - started, 1)
    cluster.add_node(num_cpus=2)  # ... which comes (add_node must run in the main thread)
    job.join(timeout=400)
    result["grown"] = {**job_result, "step": summary.get("metrics", {}).get("step"), "node_added_after": added_after}
    result["log"] = lines
    print(json.dumps({"cases": result}), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
