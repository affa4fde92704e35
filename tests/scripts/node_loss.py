"""Run by tests/test_node_loss.py in its own process: a simulated two-node Ray cluster
(ray.cluster_utils.Cluster) loses the node its training workers run on.

Usage: node_loss.py CACHE_DIR MAX_CHARS VOCAB OUT_DIR {recover|no-capacity}
Prints one JSON line with what happened.
"""

import json
import sys
import threading
import time
from pathlib import Path


def main() -> None:
    cache, max_chars, vocab, out, mode = sys.argv[1:6]
    import ray
    from ray.cluster_utils import Cluster

    from bigray.config import GPTPretrainConfig, load_config
    from bigray.recipes.gpt import pretrain
    from bigray.recipes.launch import TrainingFailed

    import socket

    with socket.socket() as sock:  # the test session's own Ray already holds the default dashboard port
        sock.bind(("127.0.0.1", 0))
        dashboard_port = sock.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_port": dashboard_port})
    node = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(GPTPretrainConfig, repo / "jobs" / "configs" / "gpt_tiny.yaml", [
        f"data.cache_dir={cache}", f"data.max_chars={max_chars}", f"data.vocab_size={vocab}", "model.block_size=64",
        "train.micro_batch_size=8", "train.max_steps=30", "train.log_interval=1", "train.eval_interval=10",
        "train.eval_batches=2", "run.checkpoint_interval=10", "run.max_failures=2", f"run.storage_path={out}",
        "run.name=node-loss",
    ])  # fmt: skip
    outcome: dict = {}

    def train():
        try:
            outcome["summary"] = pretrain(cfg)
        except TrainingFailed as e:
            outcome["error"] = str(e)

    runner = threading.Thread(target=train, daemon=True)
    runner.start()
    metrics = Path(out) / "node-loss" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and any(json.loads(r)["step"] >= 12 for r in metrics.read_text().splitlines())):
        if time.time() > deadline or not runner.is_alive():
            print(json.dumps({"finished": False, "error": outcome.get("error", "training never reached step 12")}), flush=True)
            return
        time.sleep(0.2)
    cluster.remove_node(node, allow_graceful=False)  # the node and both training workers are gone
    lost_at = time.time()
    if mode == "recover":
        time.sleep(3)
        cluster.add_node(num_cpus=2)  # capacity comes back (as an autoscaler would add it)
    runner.join(timeout=240 if mode == "recover" else 60)
    steps = [json.loads(r)["step"] for r in metrics.read_text().splitlines()]
    result = {
        "finished": "summary" in outcome,
        "error": outcome.get("error"),
        "still_waiting": runner.is_alive(),
        "steps": steps,
        "final_step": outcome.get("summary", {}).get("metrics", {}).get("step"),
        "seconds_after_loss": round(time.time() - lost_at, 1),
    }
    print(json.dumps(result), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
