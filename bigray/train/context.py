"""Where a training loop meets its runner: Ray Train workers, or one plain process.

Loops only ever ask their context for rank/world size, the checkpoint to resume from, and to
report metrics (with an optional checkpoint). :class:`RayContext` does that through
``ray.train``; :class:`LocalContext` does it in a single process without Ray (world size 1),
which is what benchmarks and GPU boxes without Ray use.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from bigray.artifacts.checkpoint import CheckpointError, CheckpointMeta, latest_complete, resume_point
from bigray.artifacts.locate import local_checkpoint
from bigray.artifacts.runs import record_failure
from bigray.artifacts.storage import delete_dir, is_dir, is_uri, name_of, subdirs
from bigray.cluster import read_secret_files, torch_device, watch_for_notices
from bigray.data.cache import DataError

log = logging.getLogger(__name__)


class TrainContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def device(self, use_gpu: bool) -> torch.device:
        return torch_device(use_gpu, self.local_rank)

    @contextlib.contextmanager
    def reported_checkpoint(self) -> Iterator[str | None]:
        """The latest checkpoint this run reported before a restart (None for a fresh run)."""
        yield None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None, name: str | None = None) -> None:
        raise NotImplementedError

    def seconds_until_preemption(self) -> float | None:
        """None, or the seconds left before a node of this run is taken away (inf: no deadline given).
        A collective: every rank asks at the same step."""
        return None

    def prepare_model(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """Move to the device (and wrap in DDP when there are several workers)."""
        return model.to(device)

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        """The loader whose batches arrive on this worker's device (its sampler shards the data)."""
        return loader

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class RayContext(TrainContext):
    """Inside a Ray Train worker: rank from the train context, checkpoints through ray.train.report.
    ``preemption_notice`` (run.preemption_notice): a source of notices besides Ray's drains."""

    def __init__(self, preemption_notice: str = "ray") -> None:
        import ray.train

        read_secret_files()  # this node's <NAME>_FILE secrets (the tracker's token)
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()
        # every worker watches (Ray's local rank cannot tell nodes apart that share an IP; asking
        # twice is cheap, and draining a draining node changes nothing)
        watch_for_notices(preemption_notice)

    def seconds_until_preemption(self) -> float | None:
        """Ray Train's preemption watcher's word (it polls Ray's node drains every 5 s)."""
        import ray.train

        info = ray.train.get_preemption_info()
        if info is None:
            return None
        return math.inf if info.deadline_ms is None else max(0.0, info.deadline_ms / 1000 - time.time())

    @contextlib.contextmanager
    def reported_checkpoint(self) -> Iterator[str | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield d

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None, name: str | None = None) -> None:
        """Report without waiting: every report is ASYNC, so a checkpoint reaches storage from Ray
        Train's background thread while training goes on, and no report waits for the controller to
        take the one before (a synchronous report does: training would run at the controller's poll
        rate). Ray deletes the local copy once uploaded, registers a checkpoint only when every
        rank's part is there (its checkpoint_manager_snapshot.json says which), and waits for the
        uploads before the run ends; a worker lost meanwhile resumes from the last registered one."""
        import ray.train
        from ray.train import CheckpointUploadMode

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(
            metrics,
            checkpoint=checkpoint,
            checkpoint_dir_name=name if checkpoint_dir else None,
            checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
        )

    def prepare_model(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        """Ray Train moves each batch to the device; no DistributedSampler: its order depends on the
        world size, the loader's own sampler does not (data/order.py StepBatches)."""
        import ray.train.torch

        return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)


class LocalContext(TrainContext):
    """One process, no Ray: checkpoints are copied to ``<run_dir>/<name>``, metrics kept in a list.

    Like a Ray run of the same name, a second run in the same directory continues from its newest
    complete checkpoint.
    """

    def __init__(self, run_dir: str):
        self.run_dir = Path(run_dir)
        self.history: list[dict[str, Any]] = []
        self.checkpoints: list[Path] = []
        _init_single_process_group()

    @contextlib.contextmanager
    def reported_checkpoint(self) -> Iterator[str | None]:
        yield latest_complete(self.run_dir) if self.run_dir.is_dir() else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None, name: str | None = None) -> None:
        self.history.append(dict(metrics))
        if checkpoint_dir:
            dest = self.run_dir / (name or f"checkpoint_{len(self.checkpoints):06d}")
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(checkpoint_dir, dest)
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            self.checkpoints.append(dest)


def _init_single_process_group() -> None:
    """A world-size-1 gloo group, so DeepSpeed and collectives work without a launcher."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group("gloo", rank=0, world_size=1)


def new_checkpoint_dir() -> str:
    """A fresh local directory for one rank's part of a checkpoint."""
    return tempfile.mkdtemp(prefix="bigray-ckpt-")


@dataclass(frozen=True)
class Resume:
    """The checkpoint a loop resumes from: its local directory, and the storage URI it was copied from."""

    directory: str
    origin: str | None = None


@contextlib.contextmanager
def checkpoint_to_resume(
    ctx: TrainContext, resume_from: str, run_dir: str | None, kind: str
) -> Iterator[Resume | None]:
    """The checkpoint every loop resumes from (None: a fresh start), chosen by
    checkpoint.resume_point from the run's latest reported checkpoint and the job's ``resume_from``:
    the rule the driver checked the job against before the workers started."""
    with ctx.reported_checkpoint() as reported:
        ckpt = resume_point(reported, resume_from, run_dir, kind)
        if ckpt and is_uri(ckpt):  # an explicit resume_from in storage: copied to this node once
            yield Resume(str(local_checkpoint(ckpt, kind)), ckpt)
        else:
            yield Resume(ckpt) if ckpt else None


@dataclass
class Stretch:
    """This start's stretch of training, for the run's history (CheckpointMeta.segments): its world
    size, the checkpoint it resumed from and its step, and how long after that checkpoint was written
    its first step ended (what the restart or resize cost: the steps thrown away, noticing the loss,
    starting workers, loading and re-sharding, the first step)."""

    world_size: int
    resumed: CheckpointMeta | None = None
    start_step: int = 0
    lost_s: float | None = None

    def resume(self, meta: CheckpointMeta, step: int, is_main: bool) -> None:
        self.resumed, self.start_step = meta, step
        if is_main and meta.world_size != self.world_size:
            log.warning("world size %d -> %d: resuming at step %d", meta.world_size, self.world_size, step)

    def stepped(self, is_main: bool) -> None:
        """Called after every step; the first one after a resume measures the seconds lost."""
        if self.lost_s is not None or self.resumed is None or self.resumed.saved_at is None:
            return
        self.lost_s = round(time.time() - self.resumed.saved_at, 1)
        if is_main:
            log.info(
                "training on %d worker(s) from step %d, %.1f s after that checkpoint was written",
                self.world_size,
                self.start_step,
                self.lost_s,
            )

    def segments(self, step: int) -> list[dict[str, Any]]:
        """The history a checkpoint written at ``step`` records: the resumed checkpoint's (its whole
        history one segment if it predates them), then this stretch, steps (start_step, step]."""
        before = [] if self.resumed is None else self.resumed.segments
        if self.resumed is not None and not before:
            before = [{"from_step": 0, "to_step": self.resumed.step, "world_size": self.resumed.world_size}]
        this = {"from_step": self.start_step, "to_step": step, "world_size": self.world_size}
        return [*before, this if self.lost_s is None else {**this, "lost_s": self.lost_s}]


def drop_abandoned_checkpoints(ctx: TrainContext, run_dir: str | None, prefix: str, start: int) -> None:
    """Delete the run's checkpoints ``<prefix>_<n>`` with n past ``start``, where training (re)starts.

    They belong to a stretch of training a restart abandoned: written after the checkpoint Ray had
    registered last (which the run resumes from), never registered. The replayed steps write into
    the same directory names, and a directory holding two world sizes' shards is not a checkpoint.
    Rank 0 deletes; every rank waits, so no rank writes into one first."""
    if run_dir is None:
        return
    if ctx.is_main:
        for d in subdirs(run_dir) if is_dir(run_dir) else []:
            number = name_of(d).removeprefix(f"{prefix}_")
            if number != name_of(d) and number.isdigit() and int(number) > start:
                log.warning("deleting %s: written after the checkpoint this run resumes from, never registered", d)
                delete_dir(d)
    if dist.is_initialized() and ctx.world_size > 1:
        dist.barrier()


PERMANENT_FAILURES = (FloatingPointError, CheckpointError, DataError)
"""Failures a retry cannot fix: a divergence, a checkpoint refused as incompatible or unsafe, prepared
data that is missing or fails its checksum. Every
rank meets them at the same point (the loss is checked after an all-reduce; every rank reads the
same checkpoint), so every rank can stop together without leaving another in a collective."""


@contextlib.contextmanager
def permanent_failures_end_the_run(ctx: TrainContext, run_dir: str) -> Iterator[None]:
    """Under Ray Train: end the run at once on a permanent failure, whatever run.max_failures says.

    Ray Train retries every worker error; here the workers instead stop normally and rank 0 records
    the reason in the run directory, which the driver raises as the run's failure. Worker crashes
    and lost nodes still raise, and are retried.
    """
    try:
        yield
    except PERMANENT_FAILURES as e:
        log.error("rank %d stops the run (a retry would fail the same way): %s", ctx.rank, e)
        if ctx.is_main:
            record_failure(run_dir, f"{type(e).__name__}: {e}")
