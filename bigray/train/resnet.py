"""The ResNet training loop: plain torch DDP via Ray Train's preparation, or alone at world size 1.

Each epoch: train on this rank's shard (a DistributedSampler from Ray Train), evaluate top-1 on
the whole test split (split across ranks without padding, counts all-reduced), then rank 0 saves
a checkpoint: weights as safetensors plus everything serving needs to preprocess identically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from bigray.checkpoint import CheckpointError, read_meta, write_meta, write_rank_marker
from bigray.config import ResNetJobConfig, ResNetTrainConfig, from_dict, to_dict
from bigray.data.images import DatasetInfo, load_images, with_absolute_root
from bigray.models.resnet import build_resnet, normalize
from bigray.train.context import LocalContext, RayContext, TrainContext, new_checkpoint_dir

log = logging.getLogger(__name__)

KIND = "resnet"


def lr_at(step: int, total_steps: int, steps_per_epoch: int, t: ResNetTrainConfig) -> float:
    """One-cycle (30% linear warmup, cosine down to ~0) or linear warmup + cosine; a pure function of the step."""
    warmup = int(0.3 * total_steps) if t.schedule == "onecycle" else int(t.warmup_epochs * steps_per_epoch)
    if step < warmup:
        start = t.lr / 25 if t.schedule == "onecycle" else 0.0
        return start + (t.lr - start) * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 0.5 * t.lr * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, t: ResNetTrainConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum or AdamW; no weight decay on biases and batch-norm parameters."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.momentum > 0)
    return torch.optim.AdamW(groups, lr=t.lr)


def augment(images: torch.Tensor, info: DatasetInfo, generator: torch.Generator) -> torch.Tensor:
    """Random crop with 4-pixel padding and (where sensible) horizontal flip, on a uint8 NCHW batch."""
    n, _, h, w = images.shape
    padded = F.pad(images, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=generator)
    dx = torch.randint(0, 9, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1).expand(n, images.shape[1], h, w)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w).expand(n, images.shape[1], h, w)
    out = padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(images.shape[1]).view(1, -1, 1, 1), rows, cols]
    if info.hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        out[flip] = out[flip].flip(-1)
    return out


class ResNetTrainer:
    """One rank's training state: model, optimizer, loaders, epoch and step counters."""

    def __init__(self, cfg: ResNetJobConfig, ctx: TrainContext, run_dir: str | None = None, splits: dict | None = None, info: DatasetInfo | None = None):
        self.cfg, self.ctx, self.run_dir = cfg, ctx, run_dir
        torch.set_num_threads(cfg.scaling.threads)
        self.device = ctx.device(cfg.scaling.use_gpu)
        if splits is None or info is None:
            splits, info = load_images(cfg.data)
        self.info = info
        t = cfg.train
        torch.manual_seed(t.seed)
        model = build_resnet(cfg.model.arch, info.num_classes, info.channels, cfg.model.small_input_stem)
        self.channels_last = self.device.type == "cuda"
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.epoch, self.step = 0, 0
        self.optimizer_state: dict | None = None
        with ctx.resume_checkpoint() as ckpt:
            ckpt = ckpt or cfg.resume_from or None
            if ckpt:
                self._load(ckpt, model)
        self.model = ctx.prepare_model(model, self.device)
        self.optimizer = make_optimizer(self.model, t)
        if self.optimizer_state is not None:
            self.optimizer.load_state_dict(self.optimizer_state)
        generator = torch.Generator().manual_seed(t.seed)
        train_loader = DataLoader(splits["train"], batch_size=t.batch_size, shuffle=True, drop_last=True, num_workers=t.num_data_workers, generator=generator)
        self.train_loader = ctx.prepare_loader(train_loader)
        test = splits["test"]
        shard = Subset(test, range(ctx.rank, len(test), ctx.world_size))
        self.test_loader = DataLoader(shard, batch_size=max(t.batch_size, 256), num_workers=t.num_data_workers)
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f"train.batch_size {t.batch_size} is larger than this worker's share of the training set")
        self.total_steps = self.steps_per_epoch * t.epochs
        bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def _to_input(self, images: torch.Tensor) -> torch.Tensor:
        x = normalize(images.to(self.device, non_blocking=True), self.info.mean, self.info.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def train_epoch(self) -> dict[str, float]:
        t = self.cfg.train
        self.model.train()
        self.ctx.set_epoch(self.train_loader, self.epoch)
        aug_gen = torch.Generator().manual_seed(t.seed * 100_003 + self.epoch * 1009 + self.ctx.rank)
        loss_sum, n, t0 = 0.0, 0, time.perf_counter()
        for images, labels in self.train_loader:
            images = images.cpu()
            if t.augment:
                images = augment(images, self.info, aug_gen)
            x, y = self._to_input(images), labels.to(self.device)
            lr = lr_at(self.step, self.total_steps, self.steps_per_epoch, t)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            with self.autocast:
                loss = F.cross_entropy(self.model(x), y, label_smoothing=t.label_smoothing)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"training diverged: loss is {loss.item()} at step {self.step} (lr {lr:.3g})")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            loss_sum += loss.item() * len(y)
            n += len(y)
        dt = time.perf_counter() - t0
        totals = self._all_reduce([loss_sum, n])
        return {"train/loss": totals[0] / totals[1], "train/images_per_s": totals[1] / dt, "train/epoch_time_s": dt, "train/lr": lr}

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
        from safetensors.torch import save_file

        d = new_checkpoint_dir()
        model_dir = Path(d, "model")
        model_dir.mkdir()
        state = {k: v.detach().cpu().contiguous() for k, v in self._bare_model().state_dict().items()}
        save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
        model_card = {"arch": self.cfg.model.arch, "small_input_stem": self.cfg.model.small_input_stem, "data": self.info.to_dict()}
        (model_dir / "model.json").write_text(json.dumps(model_card, indent=2))
        torch.save({"optimizer": self.optimizer.state_dict()}, Path(d, "train_state.pt"))
        write_meta(d, {
            "kind": KIND, "epoch": self.epoch, "step": self.step, "world_size": self.ctx.world_size,
            "writer_ranks": [0], "config": to_dict(self.cfg), "metrics": metrics,
        })  # fmt: skip
        write_rank_marker(d, 0)
        return d

    def _load(self, directory: str, model: torch.nn.Module) -> None:
        from safetensors.torch import load_file

        meta = read_meta(directory, KIND)
        saved = from_dict(ResNetJobConfig, meta["config"])
        if saved.model.arch != self.cfg.model.arch or saved.model.small_input_stem != self.cfg.model.small_input_stem:
            raise CheckpointError(f"cannot resume: checkpoint is {saved.model.arch} (small stem {saved.model.small_input_stem}), this run {self.cfg.model.arch} (small stem {self.cfg.model.small_input_stem})")
        model.load_state_dict(load_file(f"{directory}/model/model.safetensors"))
        self.optimizer_state = torch.load(Path(directory, "train_state.pt"), weights_only=True)["optimizer"]
        self.epoch, self.step = int(meta["epoch"]), int(meta["step"])
        log.info("rank %d resumed from %s at epoch %d", self.ctx.rank, directory, self.epoch)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        while self.epoch < self.cfg.train.epochs:
            metrics = self.train_epoch()
            self.epoch += 1
            metrics = {"epoch": self.epoch, "step": self.step, **metrics, **self.evaluate()}
            if self.ctx.is_main:
                log.info(
                    "epoch %d/%d train loss %.4f val loss %.4f val acc %.2f%% %.0f img/s %.1fs",
                    self.epoch, self.cfg.train.epochs, metrics["train/loss"], metrics["val/loss"],
                    100 * metrics["val/acc"], metrics["train/images_per_s"], metrics["train/epoch_time_s"],
                )  # fmt: skip
                if self.run_dir and "://" not in self.run_dir:
                    with open(Path(self.run_dir) / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(metrics) + "\n")
            ckpt = self.save(metrics)
            self.ctx.report(metrics, ckpt, f"checkpoint_epoch_{self.epoch:04d}")
        return metrics


def load_classifier(directory: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A ResNet rebuilt from a checkpoint's model/ directory alone (no unpickling)."""
    from safetensors.torch import load_file

    d = Path(directory)
    model_dir = d / "model" if (d / "model").is_dir() else d
    card_path = model_dir / "model.json"
    if not card_path.is_file():
        raise CheckpointError(f"{directory} is not a ResNet checkpoint (no model/model.json)")
    card = json.loads(card_path.read_text())
    info = card["data"]
    model = build_resnet(card["arch"], len(info["class_names"]), info["channels"], card["small_input_stem"])
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    return model.eval(), card


def ray_train_loop(config: dict[str, Any]) -> None:
    cfg = from_dict(ResNetJobConfig, config["job"])
    ResNetTrainer(cfg, RayContext(), config.get("run_dir")).fit()


def train_local(cfg: ResNetJobConfig, run_dir: str) -> tuple[dict[str, Any], LocalContext]:
    ctx = LocalContext(run_dir, cfg.resume_from or None)
    return ResNetTrainer(cfg, ctx, run_dir).fit(), ctx


def train(cfg: ResNetJobConfig) -> dict[str, Any]:
    """`bigray train-resnet`: check data and checkpoint on the driver, then train on Ray."""
    from bigray.export import resolve_checkpoint
    from bigray.runs import finish
    from bigray.train.launch import fit

    cfg = dataclasses.replace(cfg, data=with_absolute_root(cfg.data))
    load_images(cfg.data)  # fail fast on a bad data root, before any Ray work
    if cfg.resume_from:
        resolved = resolve_checkpoint(cfg.resume_from)
        read_meta(resolved, KIND)
        cfg = dataclasses.replace(cfg, resume_from=str(resolved))
    outcome = fit(ray_train_loop, cfg, cfg.scaling, cfg.run, metric="val/acc", mode="max")
    return finish(outcome.run_dir, outcome.checkpoint, outcome.metrics, best_checkpoint=outcome.best_checkpoint)
