"""`bigray cluster smoke`: after `ray up`, before the real job: the job's workers, placed as the job
places them, measure all-reduce bandwidth on each kind of link (all ranks, within a node, across
nodes) and take one ZeRO-3 step of a tiny GPT through bigray's own DeepSpeed setup.

On p5 nodes the cross-node figure tells EFA (hundreds of GB/s of bus bandwidth per node) from NCCL's
TCP fall-back (a few GB/s); on CPU workers (gloo) it checks the same code paths at small sizes.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bigray.cluster import ensure_ray, torch_device, training_precision, wait_for_workers
from bigray.config import DeepSpeedConfig, GPTPretrainConfig, GPTTrainConfig, load_config
from bigray.recipes.launch import train_scaling
from bigray.recipes.preflight import check_shared_locations


def _bandwidth(group: Any, ranks: int, nbytes: int, device: Any, iters: int = 5) -> dict[str, float]:
    """Mean all-reduce time of ``nbytes`` over ``group``; algorithm and bus bandwidth as nccl-tests
    define them (bus = alg x 2(n-1)/n: what each link carried)."""
    import torch
    import torch.distributed as dist

    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    for _ in range(2):  # warm-up: connections and buffers
        dist.all_reduce(x, group=group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x, group=group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - t0) / iters
    alg = nbytes / seconds / 1e9
    return {
        "mbytes": nbytes / 1e6,
        "ms": round(seconds * 1e3, 3),
        "alg_gbps": round(alg, 3),
        "bus_gbps": round(alg * 2 * (ranks - 1) / max(ranks, 1), 3),
    }


def _groups(node_of: list[int], rank: int) -> dict[str, tuple[Any, int]]:
    """This rank's process groups per link kind: every rank, its node's ranks, and (with several
    nodes) the ranks of the same local index on each node. Every rank creates every group."""
    import torch.distributed as dist

    nodes = sorted(set(node_of))
    found: dict[str, tuple[Any, int]] = {"all ranks": (None, len(node_of))}
    for node in nodes:
        members = [r for r, n in enumerate(node_of) if n == node]
        group = dist.new_group(members)
        if rank in members and len(members) > 1:
            found["within a node"] = (group, len(members))
    if len(nodes) > 1:
        local_index = [sum(1 for r2 in range(r) if node_of[r2] == node_of[r]) for r in range(len(node_of))]
        for index in sorted(set(local_index)):
            members = [r for r in range(len(node_of)) if local_index[r] == index]
            group = dist.new_group(members)
            if rank in members and len(members) > 1:
                found["across nodes"] = (group, len(members))
    return found


def smoke_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop: bandwidth per link kind, then one ZeRO-3 step, reported."""
    import ray.train
    import torch
    import torch.distributed as dist

    from bigray.models.gpt import build_gpt, decoder_config
    from bigray.train import engine

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch_device(config["use_gpu"], ctx.get_local_rank() if config["use_gpu"] else None)
    node_of: list[Any] = [None] * world
    dist.all_gather_object(node_of, ctx.get_node_rank())
    links = {}
    for kind, (group, ranks) in _groups(node_of, rank).items():
        links[kind] = [_bandwidth(group, ranks, int(mb * 1e6), device) for mb in config["sizes_mb"]]
    link_table: list[Any] = [None] * world
    dist.all_gather_object(link_table, links)  # "within a node" and "across nodes" from every rank's view

    precision = training_precision(config["precision"], device)
    train = GPTTrainConfig(micro_batch_size=2, grad_accum_steps=1, max_steps=1)
    ds_config = engine.deepspeed_config(
        DeepSpeedConfig(zero_stage=3, precision=precision), train, world, config["use_gpu"]
    )
    model_cfg = decoder_config("gpt2", "tiny", vocab_size=512)
    with engine.partitioned_construction(ds_config):
        model = build_gpt(model_cfg, seed=0)
    ds_engine = engine.initialize(model, [{"params": [p for p in model.parameters() if p.requires_grad]}], ds_config)
    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(rank)).to(device)
    t0 = time.perf_counter()
    loss = ds_engine(input_ids=tokens, labels=tokens).loss
    ds_engine.backward(loss)
    ds_engine.step()
    step_s = time.perf_counter() - t0
    found = {
        "world_size": world,
        "nodes": len(set(node_of)),
        "links": link_table[0],
        "zero3_loss": loss.detach().item(),
        "zero3_step_s": round(step_s, 3),
        "precision": precision,
    }
    # every rank reports (a collective in Ray Train V2); rank 0's file is the result
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "smoke.json").write_text(json.dumps(found))
        ray.train.report(
            {"zero3_loss": found["zero3_loss"]},
            checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None,
        )


def run(config_path: str | None, overrides: list[str], sizes_mb: list[float] | None = None) -> dict[str, Any]:
    """`bigray cluster smoke`: the job config's workers (scaling section) run smoke_loop; prints the
    bandwidth table and the ZeRO-3 step, returns them."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = load_config(GPTPretrainConfig, config_path, overrides)
    scaling = cfg.scaling
    sizes = sizes_mb or ([16.0, 256.0, 1024.0] if scaling.use_gpu else [1.0, 8.0])
    started = ensure_ray()
    try:
        check_shared_locations({"run.storage_path": cfg.run.storage_path})  # Ray Train keeps its run state there
        wait_for_workers(scaling)
        trainer = TorchTrainer(
            train_loop_per_worker=smoke_loop,
            train_loop_config={"use_gpu": scaling.use_gpu, "sizes_mb": sizes, "precision": cfg.deepspeed.precision},
            scaling_config=train_scaling(scaling),
            run_config=ray.train.RunConfig(name=f"cluster-smoke-{int(time.time())}", storage_path=_scratch(cfg)),
        )
        result = trainer.fit()
        with result.checkpoint.as_directory() as directory:
            metrics = json.loads(Path(directory, "smoke.json").read_text())
    finally:
        if started:
            ray.shutdown()
    for kind, rows in metrics["links"].items():
        for row in rows:
            print(
                f"{kind:14s} {row['mbytes']:9.1f} MB  {row['ms']:10.3f} ms  alg {row['alg_gbps']:8.3f} GB/s  bus {row['bus_gbps']:8.3f} GB/s"
            )
    print(
        f"ZeRO-3 step of a tiny GPT on {metrics.get('world_size')} workers ({metrics.get('nodes')} nodes, {metrics.get('precision')}): "
        f"loss {metrics.get('zero3_loss'):.3f}, {metrics.get('zero3_step_s')} s"
    )
    summary = {
        "cluster_smoke": {
            k: metrics[k]
            for k in ("world_size", "nodes", "links", "zero3_loss", "zero3_step_s", "precision")
            if k in metrics
        }
    }
    print(json.dumps(summary), flush=True)
    return summary


def _scratch(cfg: GPTPretrainConfig) -> str:
    """Ray Train's storage for the smoke run: the job's own storage, so a cluster without a shared
    filesystem needs nothing more (Ray writes only its small run state there)."""
    from bigray.artifacts.storage import absolute, join

    return join(absolute(cfg.run.storage_path), "cluster-smoke")
