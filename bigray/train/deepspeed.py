"""DeepSpeed, configured in one place: the JSON config is built from the typed config here.

The model never changes for parallelism (torchtitan's parallelize.py); this module decides ZeRO
stage, offload, precision and optimizer, and wraps the model in a DeepSpeed engine.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator

import torch

from bigray.config import DeepSpeedConfig, GPTTrainConfig

log = logging.getLogger(__name__)


def deepspeed_config(ds: DeepSpeedConfig, train: GPTTrainConfig, world_size: int, use_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run.

    On CPUs the optimizer is torch's AdamW (``torch_adam``), which avoids a JIT build of DeepSpeed's
    CPU Adam; on GPUs DeepSpeed's fused Adam (or its CPU Adam when offloading) is used.
    """
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(overlap_comm=use_gpu, contiguous_gradients=True, reduce_bucket_size=5e7)
    offload: dict[str, Any] = {"device": ds.offload_device, "pin_memory": use_gpu}
    if ds.offload_device == "nvme":
        offload["nvme_path"] = ds.nvme_path
    if ds.offload_optimizer:
        zero["offload_optimizer"] = dict(offload)
    if ds.offload_params:
        # NVMe parameter buffers must hold the largest parameter (the token embedding).
        zero["offload_param"] = {**offload, **({"buffer_count": 5, "buffer_size": 2e8} if ds.offload_device == "nvme" else {})}
    if ds.zero_stage == 3:
        zero.update(
            stage3_gather_16bit_weights_on_model_save=True,
            stage3_param_persistence_threshold=1e4,
            # Bounded working memory: the optimizer steps sub-groups of 5e7 elements (its temporaries
            # are sized by them, not by the whole partition) and at most 1e8 gathered parameters live.
            sub_group_size=5e7,
            stage3_max_live_parameters=1e8,
            stage3_max_reuse_distance=1e8,
        )
    optimizer_params: dict[str, Any] = {
        "lr": train.lr,
        "betas": [train.beta1, train.beta2],
        "eps": 1e-8,
        "weight_decay": train.weight_decay,
    }
    if not use_gpu and not ds.offload_optimizer:
        optimizer_params["torch_adam"] = True
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": train.micro_batch_size * train.grad_accum_steps * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 16},
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        **({"aio": {"block_size": 1 << 20, "queue_depth": 8, "thread_count": 1, "single_submit": False, "overlap_events": True}}
           if ds.offload_device == "nvme" else {}),
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def lr_at(step: int, train: GPTTrainConfig) -> float:
    """Linear warmup to train.lr, then cosine decay to lr * min_lr_ratio at max_steps.

    A pure function of the step, so a resumed run follows exactly the same schedule.
    """
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    span = max(1, train.max_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    min_lr = train.lr * train.min_lr_ratio
    return min_lr + 0.5 * (train.lr - min_lr) * (1 + math.cos(math.pi * progress))


def initialize(model: torch.nn.Module, param_groups: list[dict], config: dict[str, Any]) -> Any:
    """Wrap ``model`` in a DeepSpeed engine on the already-initialised process group."""
    import deepspeed

    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups, config=config, dist_init_required=False
    )
    return engine


def set_lr(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


@contextlib.contextmanager
def partitioned_construction(config: dict[str, Any]) -> Iterator[None]:
    """Under ZeRO-3, models built inside are partitioned layer by layer as they are created.

    transformers' ``from_config`` runs construction under ``deepspeed.zero.Init`` while an
    ``HfDeepSpeedConfig`` is alive, so no rank ever holds the whole model: what lets 2 workers on
    one machine train a model neither could build alone. Other stages: a no-op.
    """
    if config["zero_optimization"]["stage"] != 3:
        yield
        return
    import deepspeed
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # DeepSpeed's own view of the (already initialised) process group, so the config sees the world size.
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False, verbose=False)
    hf_config = HfDeepSpeedConfig(config)  # noqa: F841 - transformers holds only a weak reference
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def load_full_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full weights into ``model``; ZeRO-3 partitions are gathered one parameter at a time and
    rank 0's copy is scattered back, so no rank holds the whole model at once."""
    params = dict(model.named_parameters())
    if not any(hasattr(p, "ds_id") for p in params.values()):
        model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()}, strict=False)
        return
    import deepspeed
    import torch.distributed as dist

    with torch.no_grad():
        for name, p in params.items():
            if name not in state:
                continue
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if dist.get_rank() == 0:
                    p.data.copy_(state[name])
