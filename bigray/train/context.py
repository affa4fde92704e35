"""Where a training loop meets its runner: Ray Train workers, or one plain process.

Loops only ever ask their context for rank/world size, the checkpoint to resume from, and to
report metrics (with an optional checkpoint). :class:`RayContext` does that through
``ray.train``; :class:`LocalContext` does it in a single process without Ray (world size 1),
which is what benchmarks and GPU boxes without Ray use.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)


class TrainContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def device(self, use_gpu: bool) -> torch.device:
        if use_gpu:
            if not torch.cuda.is_available():
                raise RuntimeError("scaling.use_gpu is true but this worker sees no CUDA GPU")
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    @contextlib.contextmanager
    def resume_checkpoint(self) -> Iterator[str | None]:
        """The directory of the checkpoint to continue from (None for a fresh run)."""
        yield None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None, name: str | None = None) -> None:
        raise NotImplementedError

    def prepare_model(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """Move to the device (and wrap in DDP when there are several workers)."""
        return model.to(device)

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        """Shard the loader across workers (identity for one process)."""
        return loader

    def set_epoch(self, loader: DataLoader, epoch: int) -> None:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class RayContext(TrainContext):
    """Inside a Ray Train worker: rank from the train context, checkpoints through ray.train.report."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()

    @contextlib.contextmanager
    def resume_checkpoint(self) -> Iterator[str | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield d

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None, name: str | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint_dir else None)
        if checkpoint_dir:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)

    def prepare_model(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        """Ray Train's preparation: a DistributedSampler gives each rank a distinct part every epoch."""
        import ray.train.torch

        return ray.train.torch.prepare_data_loader(loader)


class LocalContext(TrainContext):
    """One process, no Ray: checkpoints are copied to ``<run_dir>/<name>``, metrics kept in a list."""

    def __init__(self, run_dir: str, resume_from: str | None = None):
        self.run_dir = Path(run_dir)
        self.resume_from = resume_from
        self.history: list[dict[str, Any]] = []
        self.checkpoints: list[Path] = []
        _init_single_process_group()

    @contextlib.contextmanager
    def resume_checkpoint(self) -> Iterator[str | None]:
        yield self.resume_from

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
