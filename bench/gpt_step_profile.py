"""Where a GPT training step's time goes: torch.profiler over bigray's own trainer (train/gpt.py).

Runs GPTTrainer as the job would (DeepSpeed ZeRO, gloo, the job's config) in 1 or 2 processes
without Ray, warms up, profiles a few steps and prints per step: data, forward (body / LM head and
loss, or model / loss on the full-logits path), backward, gradient communication (inside backward
and the optimizer step), optimizer, host syncs and what is left (Python, hooks); tokens/s and MFU
against the measured matmul peak of the precision used.

    python bench/gpt_step_profile.py                       # tiny, 50k vocab, 2 workers x 1 thread
    python bench/gpt_step_profile.py --vocab 8k --layout 1x2
    python bench/gpt_step_profile.py --preset 124m --set train.micro_batch_size=2
    python bench/gpt_step_profile.py --baseline            # also the pre-profiler path (fp32, full logits)
    python bench/gpt_step_profile.py --baseline --curve 200  # the loss both reach in 200 steps, same seed

Each variant is a row; --baseline adds one with deepspeed.precision=fp32 and train.fused_loss=off
(what bigray did before this profiler) and prints the speed-up.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import CONFIGS, save_result

RANGES = (
    "data",
    "forward",
    "forward/model",
    "forward/body",
    "forward/lm_head_loss",
    "forward/loss",
    "backward",
    "optimizer",
    "sync",
)
COMM = ("allreduce", "all_reduce", "reduce_scatter", "allgather", "all_gather", "broadcast", "gloo:")


def job_config(args: argparse.Namespace, extra: list[str]) -> Any:
    from bigray.config import GPTPretrainConfig, load_config

    workers, threads = (int(n) for n in args.layout.split("x"))
    overrides = [
        f"model.preset={args.preset}",
        f"scaling.num_workers={workers}",
        f"scaling.threads_per_worker={threads}",
        f"data.tokenizer={'gpt2' if args.vocab == '50k' else 'bpe'}",
        f"run.storage_path={tempfile.mkdtemp()}",
        *(["data.vocab_size=8192"] if args.vocab == "8k" else []),
        *args.set,
        *extra,
    ]
    return load_config(GPTPretrainConfig, CONFIGS / "gpt_tiny.yaml", overrides)


def prepare(cfg: Any) -> str:
    from bigray.recipes.gpt import prepare_pretrain

    return prepare_pretrain(cfg).data_dir


def _worker(
    rank: int, world: int, port: int, cfg: Any, data_dir: str, steps: int, warmup: int, out: str, curve: int
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world)
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from bigray.train.context import TrainContext
    from bigray.train.gpt import GPTTrainer

    ctx = TrainContext()
    ctx.rank, ctx.world_size = rank, world
    t0 = time.perf_counter()
    trainer = GPTTrainer(cfg, ctx, data_dir)
    startup = time.perf_counter() - t0
    if curve:  # train `curve` steps from the same seed: the loss the speed buys
        t0 = time.perf_counter()
        rows = [trainer.train_step() for _ in range(curve)]
        wall = time.perf_counter() - t0
        val = trainer.evaluate()["val/loss"]
        if rank == 0:
            marks = sorted({*range(25, curve + 1, 25), curve})
            torch.save(
                {
                    "train_loss_at": {m: round(rows[m - 1]["train/loss"], 4) for m in marks},
                    "val_loss": val,
                    "minutes": wall / 60,
                    "tokens_per_s": sum(r["train/tokens_per_s"] for r in rows[2:]) / max(1, curve - 2),
                },
                out,
            )
        dist.destroy_process_group()
        return
    for _ in range(warmup):
        trainer.train_step()
    from torch.profiler import ProfilerActivity, profile

    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        rows = [trainer.train_step() for _ in range(steps)]
        wall = time.perf_counter() - t0
    if rank == 0:
        per_step = {}
        events = prof.key_averages()
        for e in events:
            if e.key in RANGES:
                per_step[e.key] = e.cpu_time_total / 1e6 / steps
        comm = (
            sum(
                e.cpu_time_total
                for e in events
                if any(c in e.key.lower() for c in COMM) and not e.key.startswith("record_param")
            )
            / 1e6
            / steps
        )
        top = [r for r in ("data", "forward", "backward", "optimizer", "sync") if r in per_step]
        summary = {
            "step_s": wall / steps,
            **{f"{k}_s": v for k, v in per_step.items()},
            "comm_s": comm,
            "other_s": wall / steps - sum(per_step[k] for k in top),
            "tokens_per_s": sum(r["train/tokens_per_s"] for r in rows) / steps,
            "mfu": sum(r["train/mfu"] for r in rows) / steps,
            "loss": rows[-1]["train/loss"],
            "peak_gflops": trainer.peak / 1e9,
            "precision": "bf16" if trainer.cpu_bf16 or trainer.ds_config["bf16"]["enabled"] else "fp32",
            "fused_loss": trainer.fused_loss,
            "startup_s": startup,
        }
        torch.save(summary, out)
        if os.environ.get("BIGRAY_PROFILE_TABLE"):
            print(events.table(sort_by="self_cpu_time_total", row_limit=20))
    dist.destroy_process_group()


def profile_variant(cfg: Any, data_dir: str, steps: int, warmup: int, curve: int = 0) -> dict[str, Any]:
    world = cfg.scaling.num_workers
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(tempfile.mkdtemp()) / "summary.pt"
    mp.start_processes(
        _worker, args=(world, port, cfg, data_dir, steps, warmup, str(out), curve), nprocs=world, start_method="spawn"
    )
    return torch.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab", choices=("8k", "50k"), default="50k")
    parser.add_argument("--layout", default="2x1", help="workers x threads per worker")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--baseline", action="store_true", help="also profile fp32 with full logits (the old path)")
    parser.add_argument("--set", action="append", default=[], help="config override, as on the CLI")
    parser.add_argument(
        "--curve",
        type=int,
        default=0,
        metavar="STEPS",
        help="instead of profiling, train STEPS steps per variant (same seed) and compare the losses",
    )
    args = parser.parse_args()

    variants = {"current": []}
    if args.baseline:
        variants = {"baseline (fp32, full logits)": ["deepspeed.precision=fp32", "train.fused_loss=off"], **variants}
    data_dir = prepare(job_config(args, []))
    results = {}
    for name, extra in variants.items():
        results[name] = profile_variant(job_config(args, extra), data_dir, args.steps, args.warmup, args.curve)
    if args.curve:
        print(f"\n{args.preset}, {args.vocab} vocab, {args.layout}, {args.curve} steps from the same seed")
        for name, r in results.items():
            print(
                f"{name:30} train loss {r['train_loss_at']}  val loss {r['val_loss']:.4f}  {r['tokens_per_s']:.0f} tok/s  {r['minutes']:.1f} min"
            )
        save_result(
            f"gpt_step_curve_{args.preset}_{args.vocab}_{args.layout}", {"args": vars(args), "results": results}
        )
        return
    print(
        f"\n{args.preset}, {args.vocab} vocab, {args.layout} (workers x threads), {args.steps} profiled steps; seconds per step"
    )
    keys = [
        "startup_s",
        "step_s",
        "data_s",
        "forward_s",
        "forward/body_s",
        "forward/lm_head_loss_s",
        "forward/model_s",
        "forward/loss_s",
        "backward_s",
        "comm_s",
        "optimizer_s",
        "sync_s",
        "other_s",
        "tokens_per_s",
        "mfu",
        "peak_gflops",
        "loss",
    ]
    print(f"{'':24}" + "".join(f"{n[:28]:>30}" for n in results))
    for k in keys:
        cells = [r.get(k) for r in results.values()]
        if all(c is None for c in cells):
            continue
        print(f"{k:24}" + "".join(f"{c:>30.4g}" if c is not None else f"{'-':>30}" for c in cells))
    print(
        f"{'precision / fused loss':24}"
        + "".join(f"{r['precision'] + ' / ' + str(r['fused_loss']):>30}" for r in results.values())
    )
    if args.baseline:
        base, cur = results["baseline (fp32, full logits)"], results["current"]
        print(f"speed-up (tokens/s): {cur['tokens_per_s'] / base['tokens_per_s']:.2f}x")
    save_result(f"gpt_step_profile_{args.preset}_{args.vocab}_{args.layout}", {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
