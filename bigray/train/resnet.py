"""The ResNet training loop (worker side): plain torch DDP via Ray Train's preparation, or alone at
world size 1. Workers read the image data the driver checked and pinned (no downloads here).

Each epoch: train on this rank's slice of every step's global batch (data/order.py StepBatches: the
same images in the same order at any world size), evaluate top-1 on the whole test split (split across ranks without padding, counts all-reduced), then rank 0 saves
a checkpoint: weights as safetensors plus everything serving needs to preprocess identically.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from bigray.artifacts.checkpoint import CheckpointMeta, read_meta, write_meta, write_rank_marker
from bigray.artifacts.resnet_card import save_classifier
from bigray.cluster import enable_tf32, training_precision
from bigray.config import ResNetJobConfig, ResNetTrainConfig, from_dict, to_dict
from bigray.data.images import DatasetInfo, load_images
from bigray.data.order import DIGEST_MOD, StepBatches
from bigray.models.resnet import build_resnet, normalize
from bigray.train.context import (
    LocalContext,
    RayContext,
    Stretch,
    TrainContext,
    checkpoint_to_resume,
    drop_abandoned_checkpoints,
    new_checkpoint_dir,
    permanent_failures_end_the_run,
)
from bigray.train.metrics import RunLog
from bigray.train.optim import make_optimizer, resnet_lr

log = logging.getLogger(__name__)

KIND = "resnet"


MIN_STEPS = 250
"""Optimizer steps an automatically sized run gets at least (the batch shrinks to give them)."""


def global_batch(t: ResNetTrainConfig, train_images: int, world_size: int) -> int:
    """Images per optimizer step over all workers: train.global_batch_size, else batch_size x workers,
    else (both 0) the largest power of two from 128 (the full-data recipe) down to 16 that gives the
    run at least MIN_STEPS optimizer steps, in whole images per worker and at least 8 per worker
    (BatchNorm's floor). Measured on 2 workers over 2 epochs of 4,000 Fashion-MNIST images: a global
    128 (62 steps) 72.7% test accuracy, 64 (124 steps) 83.4% (bench/README.md)."""
    if t.global_batch_size or t.batch_size:
        return t.global_batch_size or t.batch_size * world_size
    batch = 128
    while batch > 16 and train_images * t.epochs // batch < MIN_STEPS:
        batch //= 2
    return max(batch // world_size, 8) * world_size


def augment_draws(seed: int, step: int, global_batch: int, part: slice) -> tuple[torch.Tensor, ...]:
    """Crop offsets and flips for the images of ``part`` of a step's global batch, drawn for the whole
    batch from (seed, step): an image's augmentation does not depend on the world size."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))
    dy, dx = (torch.randint(0, 9, (global_batch,), generator=generator)[part] for _ in range(2))
    return dy, dx, (torch.rand(global_batch, generator=generator) < 0.5)[part]


def augment(images: torch.Tensor, info: DatasetInfo, draws: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Random crop with 4-pixel padding and (where sensible) horizontal flip, on a uint8 NCHW batch,
    on whatever device the batch is (a GPU batch never goes back to the CPU); ``draws`` are
    :func:`augment_draws`' (row offsets, column offsets, flips), one each per image."""
    n, c, h, w = images.shape
    dev = images.device
    dy, dx, flip = (d.to(dev) for d in draws)
    padded = F.pad(images, (4, 4, 4, 4))
    rows = (dy.view(n, 1) + torch.arange(h, device=dev).view(1, h)).view(n, 1, h, 1).expand(n, c, h, w)
    cols = (dx.view(n, 1) + torch.arange(w, device=dev).view(1, w)).view(n, 1, 1, w).expand(n, c, h, w)
    out = padded[
        torch.arange(n, device=dev).view(n, 1, 1, 1), torch.arange(c, device=dev).view(1, -1, 1, 1), rows, cols
    ]
    if info.hflip:
        out[flip] = out[flip].flip(-1)
    return out


class ResNetTrainer:
    """One rank's training state: model, optimizer, loaders, epoch and step counters."""

    def __init__(
        self,
        cfg: ResNetJobConfig,
        ctx: TrainContext,
        run_dir: str | None = None,
        splits: dict | None = None,
        info: DatasetInfo | None = None,
    ):
        self.cfg, self.ctx, self.run_dir = cfg, ctx, run_dir
        torch.set_num_threads(cfg.scaling.threads)
        self.device = ctx.device(cfg.scaling.use_gpu)
        if splits is None or info is None:
            splits, info = load_images(cfg.data)
        self.info = info
        t = cfg.train
        torch.manual_seed(t.seed)
        model = build_resnet(
            cfg.model.arch, info.num_classes, info.channels, cfg.model.small_input_stem, cfg.model.zero_init_residual
        )
        # channels_last: what cuDNN's and oneDNN's convolutions want; 1.09x images/s in bf16 and 1.13x in fp32
        # on this CPU (bench/resnet_memory_format.py)
        model = model.to(memory_format=torch.channels_last)
        self.epoch, self.step = 0, 0
        self.stretch = Stretch(ctx.world_size)
        self.model = ctx.prepare_model(model, self.device)
        self.optimizer = make_optimizer(self.model, t)
        pin = self.device.type == "cuda"  # pinned host memory: the copy to the GPU overlaps compute
        self.global_batch = global_batch(t, len(splits["train"]), ctx.world_size)
        self.batch_size = self.global_batch // ctx.world_size
        # The data order is the sampler's (data/order.py), a function of the step and the sample, not the rank.
        self.batches = StepBatches(len(splits["train"]), self.global_batch, ctx.rank, ctx.world_size, t.seed)
        train_loader = DataLoader(
            splits["train"], batch_sampler=self.batches, num_workers=t.num_data_workers, pin_memory=pin
        )
        self.train_loader = ctx.prepare_loader(train_loader)
        test = splits["test"]
        shard = Subset(test, range(ctx.rank, len(test), ctx.world_size))
        self.test_loader = DataLoader(shard, batch_size=max(self.batch_size, 256), num_workers=t.num_data_workers)
        self.steps_per_epoch = len(self.batches)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"a global batch of {self.global_batch} images is larger than the training set ({len(splits['train'])})"
            )
        self.total_steps = self.steps_per_epoch * t.epochs
        enable_tf32(self.device)
        # 'auto': bf16 where the GPU or the CPU has bf16 units (on this CPU 2x fp32's images/s, bench/README.md)
        bf16 = training_precision(t.precision, self.device, fp16=False, cpu_bf16=True) == "bf16"
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)
        self.run_log = RunLog.for_job(cfg, ctx, run_dir, self.device, precision="bf16" if bf16 else "fp32")

    def _to_input(self, images: torch.Tensor) -> torch.Tensor:
        x = normalize(images.to(self.device, non_blocking=True), self.info.mean, self.info.std)
        return x.contiguous(memory_format=torch.channels_last)

    def train_epoch(self) -> dict[str, float]:
        t = self.cfg.train
        self.model.train()
        self.batches.set_epoch(self.epoch)
        mine = slice(self.ctx.rank * self.batch_size, (self.ctx.rank + 1) * self.batch_size)
        loss_sum, n, t0 = 0.0, 0, time.perf_counter()
        for images, labels in self.train_loader:  # on the GPU already when training on one (Ray moves each batch)
            if t.augment:
                images = augment(images, self.info, augment_draws(t.seed, self.step, self.global_batch, mine))
            x, y = self._to_input(images), labels.to(self.device)
            lr = resnet_lr(self.step, self.total_steps, self.steps_per_epoch, t, self.global_batch)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            with self.autocast:
                loss = F.cross_entropy(self.model(x), y, label_smoothing=t.label_smoothing)
            # Summed over ranks first: every rank sees a divergence at the same step and stops together.
            if not math.isfinite(self._all_reduce([loss.item()])[0]):
                raise FloatingPointError(f"training diverged: loss is {loss.item()} at step {self.step} (lr {lr:.3g})")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            self.stretch.stepped(self.ctx.is_main)
            loss_sum += loss.item() * len(y)
            n += len(y)
        dt = time.perf_counter() - t0
        totals = self._all_reduce([loss_sum, n, self.batches.digest()])
        return {
            "train/loss": totals[0] / totals[1],
            "train/images_per_s": totals[1] / dt,
            "train/epoch_time_s": dt,
            "train/lr": lr,
            "train/world_size": self.ctx.world_size,
            "train/images": int(totals[2]) % DIGEST_MOD,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        loss_sum, correct, n = 0.0, 0, 0
        for images, labels in self.test_loader:
            x, y = self._to_input(images), labels.to(self.device)
            with self.autocast:
                logits = self.model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            n += len(y)
        loss_sum, correct, n = self._all_reduce([loss_sum, correct, n])
        return {"val/loss": loss_sum / n, "val/acc": correct / n}

    def _all_reduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(t)
        return t.tolist()

    # ------------------------------------------------------------------ checkpoints

    def _bare_model(self) -> torch.nn.Module:
        return getattr(self.model, "module", self.model)

    def save(self, metrics: dict[str, Any]) -> str | None:
        """Rank 0 writes the checkpoint (DDP replicas are identical); other ranks return None."""
        if not self.ctx.is_main:
            return None
        d = new_checkpoint_dir()
        model_card = {
            "arch": self.cfg.model.arch,
            "small_input_stem": self.cfg.model.small_input_stem,
            "data": self.info.to_dict(),
        }
        save_classifier(Path(d, "model"), self._bare_model().state_dict(), model_card)
        torch.save({"optimizer": self.optimizer.state_dict()}, Path(d, "train_state.pt"))
        write_meta(
            d,
            CheckpointMeta(
                kind=KIND,
                step=self.step,
                world_size=self.ctx.world_size,
                writer_ranks=[0],
                segments=self.stretch.segments(self.step),
                config=to_dict(self.cfg),
                metrics=metrics,
                epoch=self.epoch,
            ),
        )
        write_rank_marker(d, 0)
        return d

    def load(self, directory: str) -> CheckpointMeta:
        """Restore weights, optimizer state, epoch and step from a checkpoint the driver checked against
        this job (recipes.launch.resuming); every rank loads the same one. Returns its metadata."""
        from safetensors.torch import load_file

        meta = read_meta(directory, KIND)
        self._bare_model().load_state_dict(load_file(f"{directory}/model/model.safetensors"))
        self.optimizer.load_state_dict(torch.load(Path(directory, "train_state.pt"), weights_only=True)["optimizer"])
        # ResNet checkpoints at epoch ends: the step is the epoch's, at this run's global batch
        self.epoch = meta.epoch or 0
        self.step = self.epoch * self.steps_per_epoch
        self.stretch.resume(meta, self.step, self.ctx.is_main)
        log.info("rank %d resumed from %s at epoch %d", self.ctx.rank, directory, self.epoch)
        return meta

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """Train to ``train.epochs`` (resuming first if there is a checkpoint); returns the last metrics."""
        with checkpoint_to_resume(self.ctx, self.cfg.resume_from, self.run_dir, KIND) as ckpt:
            if ckpt:
                self.load(ckpt.directory)
        drop_abandoned_checkpoints(self.ctx, self.run_dir, "checkpoint_epoch", self.epoch)
        metrics: dict[str, Any] = {}
        while self.epoch < self.cfg.train.epochs:
            metrics = self.train_epoch()
            self.epoch += 1
            metrics = {"epoch": self.epoch, "step": self.step, **metrics, **self.evaluate()}
            if self.ctx.is_main:
                log.info(
                    "epoch %d/%d train loss %.4f val loss %.4f val acc %.2f%% %.0f img/s %.1fs",
                    self.epoch,
                    self.cfg.train.epochs,
                    metrics["train/loss"],
                    metrics["val/loss"],
                    100 * metrics["val/acc"],
                    metrics["train/images_per_s"],
                    metrics["train/epoch_time_s"],
                )
            self.run_log.write(metrics, self.step, checkpoint=True)
            ckpt = self.save(metrics)
            self.ctx.report(metrics, ckpt, f"checkpoint_epoch_{self.epoch:04d}")
        self.run_log.close()
        return metrics


def resnet_loop(config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker for ResNet training."""
    cfg = from_dict(ResNetJobConfig, config["job"])
    ctx = RayContext(cfg.run.preemption_notice)  # a noticed node is drained: the restart goes elsewhere
    with permanent_failures_end_the_run(ctx, config["run_dir"]):
        ResNetTrainer(cfg, ctx, config["run_dir"]).run()


def run_local(cfg: ResNetJobConfig, run_dir: str) -> tuple[dict[str, Any], LocalContext]:
    """The same loop in this process without Ray (world size 1), on data the driver checked."""
    ctx = LocalContext(run_dir)
    return ResNetTrainer(cfg, ctx, run_dir).run(), ctx
