"""What a loop records: peak FLOP/s for MFU (a table for known GPUs, measured for CPUs), and the
run log rank 0 writes (metrics.jsonl and TensorBoard in the run directory, and the tracking run)."""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any

import torch

from bigray.artifacts.runs import METRICS, append_metrics
from bigray.artifacts.storage import exists, is_uri, join, read_text, upload, write_text
from bigray.artifacts.tracking import TrackedRun, flat_params, versions
from bigray.config import TrackingConfig

# Dense bf16/fp16 tensor-core peaks (FLOP/s) from the vendors' data sheets.
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "A10": 125e12,
    "L4": 121e12,
    "V100": 125e12,
    "T4": 65e12,
}


def measure_matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 0.3) -> float:
    """FLOP/s of torch.mm on this CPU with the current thread count (the CPU MFU denominator)."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b)
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        iters += 1
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def peak_flops(device: torch.device, precision: str) -> float:
    """Peak FLOP/s of one worker's device for the training precision (0 if unknown)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak if precision in ("bf16", "fp16") else peak / 2  # tf32 runs at half rate
        return 0.0
    return measure_matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32)


class RunLog:
    """Rank 0's record of a run in its run directory: ``metrics.jsonl``, TensorBoard scalars, and the
    tracking run (MLflow or W&B) that ``tracking`` names.

    A run directory in storage gets the same files: they are written to a local mirror (seeded with
    the run's earlier ``metrics.jsonl``, so a resumed run keeps its history) and uploaded after every
    report. Other ranks and runs without a directory log nothing.
    """

    def __init__(self, run_dir: str | None, is_main: bool, tracking: TrackingConfig | None = None, *,
                 run_name: str = "", params: dict[str, str] | None = None, tags: dict[str, Any] | None = None):  # fmt: skip
        self.run_dir = run_dir if is_main and run_dir else None
        self.writer: Any = None
        self.local: str | None = None
        self.tracked: TrackedRun | None = None
        if self.run_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.local = self.run_dir if not is_uri(self.run_dir) else tempfile.mkdtemp(prefix="bigray-runlog-")
            if is_uri(self.run_dir) and exists(join(self.run_dir, METRICS)):
                write_text(join(self.local, METRICS), read_text(join(self.run_dir, METRICS)))
            self.writer = SummaryWriter(f"{self.local}/tensorboard")
            if tracking is not None:
                tags = {k: str(v) for k, v in (tags or {}).items()}
                self.tracked = TrackedRun.start(tracking, self.run_dir, run_name, params or {}, tags, files_dir=self.local)

    @classmethod
    def for_job(cls, cfg: Any, ctx: Any, run_dir: str | None, device: torch.device, **facts: Any) -> RunLog:
        """The run log of a job on rank 0, tracked where ``cfg.tracking`` says, with the facts that
        matter when comparing runs (world size, device, versions and the loop's own ``facts``)."""
        tags = {"world_size": ctx.world_size, "device": device.type, **facts, **versions()} if ctx.is_main else {}
        params = flat_params(cfg) if ctx.is_main else {}
        return cls(run_dir, ctx.is_main, cfg.tracking, run_name=cfg.run.name, params=params, tags=tags)

    def write(self, metrics: dict[str, Any], step: int) -> None:
        if self.run_dir is None or self.local is None:
            return
        append_metrics(self.local, metrics)
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()
        if self.tracked is not None:
            self.tracked.log_metrics(metrics, step)
        if is_uri(self.run_dir):
            upload(join(self.local, METRICS), join(self.run_dir, METRICS))
            upload(join(self.local, "tensorboard"), join(self.run_dir, "tensorboard"))

    def close(self) -> None:
        """The run trained to its end: close TensorBoard and mark the tracking run finished."""
        if self.writer is not None:
            self.writer.close()
        if self.tracked is not None:
            self.tracked.close("FINISHED")
