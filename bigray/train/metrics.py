"""What a loop records: peak FLOP/s for MFU (a table for known GPUs, measured for CPUs), and the
run log rank 0 writes (metrics.jsonl and TensorBoard in the run directory, and the tracking run)."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from bigray.artifacts.runs import METRICS, append_metrics
from bigray.artifacts.storage import cache_root, is_file, is_uri, join, read_text, upload, write_bytes, write_text
from bigray.artifacts.tracking import TrackedRun, flat_params, versions
from bigray.config import TrackingConfig

# Dense (no sparsity) peak TFLOP/s per GPU from NVIDIA's data sheets: (bf16, fp16, tf32, fp32).
# 0 means the GPU has no tensor cores for that type. Matched against torch's device name in this
# order, so a variant ("H100 PCIe") is found before its family ("H100", the SXM part).
GPU_PEAK_TFLOPS: dict[str, tuple[float, float, float, float]] = {
    "B200": (2250, 2250, 1100, 75),
    "H200 NVL": (835, 835, 418, 60),
    "H200": (989, 989, 495, 67),
    "H100 NVL": (835, 835, 418, 60),
    "H100 PCIe": (756, 756, 378, 51),
    "H100": (989, 989, 495, 67),
    "A100": (312, 312, 156, 19.5),
    "L40S": (362, 362, 183, 91.6),
    "L4": (121, 121, 60, 30.3),
    "A10G": (70, 70, 35, 31.2),
    "A10": (125, 125, 62.5, 31.2),
    "V100": (0, 125, 0, 15.7),
    "T4": (0, 65, 0, 8.1),
}


def gpu_peak(name: str, precision: str) -> float:
    """Peak FLOP/s of the GPU called ``name`` for a precision (fp32 runs on TF32 where the GPU has it); 0 if unknown."""
    for key, (bf16, fp16, tf32, fp32) in GPU_PEAK_TFLOPS.items():
        if key in name:
            peak = {"bf16": bf16, "fp16": fp16}.get(precision, tf32 or fp32)
            return peak * 1e12
    return 0.0


def measure_matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 0.3) -> float:
    """FLOP/s of torch.mm on this CPU with the current thread count (the CPU MFU denominator): the
    best of 0.1 s windows over ``seconds``, so a moment of contention does not lower the peak."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        iters, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.1:
            torch.mm(a, b)
            iters += 1
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0))
    return best


def peak_flops(device: torch.device, precision: str) -> float:
    """Peak FLOP/s of one worker's device for the training precision (0 if unknown)."""
    if device.type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(device), precision)
    return _cached_peak(torch.bfloat16 if precision == "bf16" else torch.float32, torch.get_num_threads())


@functools.cache
def _cached_peak(dtype: torch.dtype, threads: int) -> float:
    """The matmul peak of this CPU, measured once per machine and kept in this node's cache
    (``<cache_root>/matmul_peak.json``, keyed by CPU model, dtype, thread count and torch version):
    a trainer start reads it instead of measuring, and the one measurement can take a full second."""
    key = f"{_cpu_model()}|{dtype}|{threads} threads|torch {torch.__version__}"
    path = cache_root() / "matmul_peak.json"
    known: dict[str, float] = {}
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(path.read_text())
    if not isinstance(known.get(key), float):
        known[key] = measure_matmul_peak(dtype, seconds=1.0)
        with contextlib.suppress(OSError):  # a read-only home only costs the next start a measurement
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1))
            tmp.replace(path)
    return known[key]


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


class StartUp:
    """Where a worker's seconds before its first training step went, logged once by rank 0.

    ``submitted_at`` (wall clock) is when the driver handed the run to Ray Train, so the first line
    also shows what Ray's controller and worker start took before this process began its own work.
    """

    def __init__(self, submitted_at: float | None = None):
        self.submitted_at = submitted_at
        self.began = time.time()
        self.phases: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        """Each phase's seconds as ``startup/<phase>_s`` (``startup/resume_s``, ...)."""
        return {f"startup/{name.replace(' ', '_').lower()}_s": round(s, 3) for name, s in self.phases.items()}

    def summary(self) -> str:
        """One line: each phase in seconds, then the total to the end of the first step."""
        parts = []
        if self.submitted_at is not None:
            parts.append(f"Ray Train workers {self.began - self.submitted_at:.1f}")
        parts += [f"{name} {seconds:.1f}" for name, seconds in self.phases.items()]
        since = self.submitted_at if self.submitted_at is not None else self.began
        return f"start-up (s): {', '.join(parts)}; first step done {time.time() - since:.1f} s after " + (
            "the run was submitted" if self.submitted_at is not None else "the trainer started"
        )


class RunLog:
    """Rank 0's record of a run in its run directory: ``metrics.jsonl``, TensorBoard scalars, and the
    tracking run (MLflow or W&B) that ``tracking`` names.

    A run directory in storage gets the same files: they are written to a local mirror (seeded with
    the run's earlier ``metrics.jsonl``, so a resumed run keeps its history) and uploaded: the small
    ``metrics.jsonl`` after every report (what a run did before a crash stays on record) by a
    background thread, so training never waits for it; the TensorBoard files, which grow and cost a
    listing, with every checkpoint, at least every ``UPLOAD_EVERY_S`` seconds and at the end. Other
    ranks and runs without a directory log nothing.
    """

    UPLOAD_EVERY_S = 60.0

    def __init__(
        self,
        run_dir: str | None,
        is_main: bool,
        tracking: TrackingConfig | None = None,
        *,
        run_name: str = "",
        params: dict[str, str] | None = None,
        tags: dict[str, Any] | None = None,
    ):
        self.run_dir = run_dir if is_main and run_dir else None
        self.writer: Any = None
        self.local: str | None = None
        self.tracked: TrackedRun | None = None
        self.uploaded_at = time.monotonic()
        self.metrics_upload = _LatestUpload(join(run_dir, METRICS)) if self.run_dir and is_uri(self.run_dir) else None
        if self.run_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.local = self.run_dir if not is_uri(self.run_dir) else tempfile.mkdtemp(prefix="bigray-runlog-")
            if is_uri(self.run_dir) and is_file(join(self.run_dir, METRICS)):
                write_text(join(self.local, METRICS), read_text(join(self.run_dir, METRICS)))
            self.writer = SummaryWriter(f"{self.local}/tensorboard")
            if tracking is not None:
                tags = {k: str(v) for k, v in (tags or {}).items()}
                self.tracked = TrackedRun.start(
                    tracking, self.run_dir, run_name, params or {}, tags, files_dir=self.local
                )

    @classmethod
    def for_job(cls, cfg: Any, ctx: Any, run_dir: str | None, device: torch.device, **facts: Any) -> RunLog:
        """The run log of a job on rank 0, tracked where ``cfg.tracking`` says, with the facts that
        matter when comparing runs (world size, device, versions and the loop's own ``facts``)."""
        tags = {"world_size": ctx.world_size, "device": device.type, **facts, **versions()} if ctx.is_main else {}
        params = flat_params(cfg) if ctx.is_main else {}
        return cls(run_dir, ctx.is_main, cfg.tracking, run_name=cfg.run.name, params=params, tags=tags)

    def write(self, metrics: dict[str, Any], step: int, *, checkpoint: bool = False) -> None:
        """Record one report's metrics; ``checkpoint``: this report also saves a checkpoint."""
        if self.run_dir is None or self.local is None:
            return
        append_metrics(self.local, metrics)
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()
        if self.tracked is not None:
            self.tracked.log_metrics(metrics, step)
        if self.metrics_upload is not None:
            self.metrics_upload.put(Path(self.local, METRICS).read_bytes())
            if checkpoint or time.monotonic() - self.uploaded_at >= self.UPLOAD_EVERY_S:
                self._upload_tensorboard()

    def _upload_tensorboard(self) -> None:
        if self.run_dir is not None and self.local is not None and is_uri(self.run_dir):
            upload(join(self.local, "tensorboard"), join(self.run_dir, "tensorboard"))
        self.uploaded_at = time.monotonic()

    def close(self) -> None:
        """The run trained to its end: close and upload TensorBoard, mark the tracking run finished."""
        if self.writer is not None:
            self.writer.close()
            self._upload_tensorboard()
        if self.metrics_upload is not None:
            self.metrics_upload.finish()
        if self.tracked is not None:
            self.tracked.close("FINISHED")


class _LatestUpload:
    """Uploads the newest bytes given for one object from a background thread: a put while an upload
    runs replaces what is waiting (only the latest version matters), and a failed upload is raised
    in the training thread at the next put or at :meth:`finish`."""

    def __init__(self, location: str):
        self.location = location
        self._lock = threading.Lock()
        self._waiting: bytes | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def put(self, data: bytes) -> None:
        self._raise_failure()
        with self._lock:
            self._waiting = data
            if self._thread is None:
                self._thread = threading.Thread(target=self._drain, name="bigray-metrics-upload", daemon=True)
                self._thread.start()

    def _drain(self) -> None:
        while True:
            with self._lock:
                data, self._waiting = self._waiting, None
                if data is None:
                    self._thread = None
                    return
            try:
                write_bytes(self.location, data)
            except BaseException as e:  # kept for the training thread, which fails the run with it
                self._error = e

    def finish(self) -> None:
        """Wait until the latest version is uploaded."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join()
        self._raise_failure()

    def _raise_failure(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
