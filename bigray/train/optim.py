"""Parameter groups and learning-rate schedules, shared by the GPT and ResNet loops.

Schedules are pure functions of the optimizer step, so a resumed run follows exactly the schedule
the uninterrupted run would have.
"""

from __future__ import annotations

import math

import torch

from bigray.config import GPTTrainConfig, ResNetTrainConfig


def full_ndim(p: torch.Tensor) -> int:
    """A parameter's number of dimensions as built: under ZeRO-3 a partitioned parameter is an empty
    1-D placeholder and its real shape is ``ds_shape``."""
    return len(getattr(p, "ds_shape", p.shape))


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups: weight decay on matrices and embeddings, none on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if full_ndim(p) >= 2]
    no_decay = [p for p in params if full_ndim(p) < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, *, peak: float, total: int, warmup: int, start: float = 0.0, end: float = 0.0) -> float:
    """Linear warmup from ``start`` to ``peak`` over ``warmup`` steps, then cosine down to ``end`` at ``total``."""
    if step < warmup:
        return start + (peak - start) * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return end + 0.5 * (peak - end) * (1 + math.cos(math.pi * progress))


def gpt_lr(step: int, t: GPTTrainConfig, seconds: float = 0.0) -> float:
    """GPT: warmup to train.lr, cosine to lr * min_lr_ratio at the run's last step: max_steps, or
    with train.max_minutes the step the budget runs out at if sooner, projected from the step rate
    measured so far (``step`` steps in ``seconds`` of training), so the decay ends with the budget at
    any world size and across resumes."""
    total = t.max_steps
    if t.max_minutes and seconds > 0:
        total = min(total, max(step, round(step * t.max_minutes * 60 / seconds)))
    return warmup_cosine(step, peak=t.lr, total=total, warmup=t.warmup_steps, end=t.lr * t.min_lr_ratio)


def resnet_peak_lr(t: ResNetTrainConfig, global_batch: int) -> float:
    """The run's peak learning rate: ``lr`` scaled linearly by the global batch over the reference batch."""
    return t.lr * global_batch / t.lr_reference_batch


def resnet_lr(step: int, total_steps: int, steps_per_epoch: int, t: ResNetTrainConfig, global_batch: int) -> float:
    """ResNet: one-cycle (30% of the run's steps warming up from peak/25, cosine to 0) or linear
    warmup + cosine to 0; both defined by the run's total steps, so a short run decays too."""
    peak = resnet_peak_lr(t, global_batch)
    if t.schedule == "onecycle":
        return warmup_cosine(step, peak=peak, total=total_steps, warmup=int(0.3 * total_steps), start=peak / 25)
    return warmup_cosine(step, peak=peak, total=total_steps, warmup=int(t.warmup_epochs * steps_per_epoch))


def make_optimizer(model: torch.nn.Module, t: ResNetTrainConfig) -> torch.optim.Optimizer:
    """ResNet's optimizer: SGD with Nesterov momentum or AdamW, on :func:`decay_groups`."""
    groups = decay_groups(model, t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.momentum > 0)
    return torch.optim.AdamW(groups, lr=t.lr)
