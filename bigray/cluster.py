"""Connecting to Ray and checking what the cluster can run: used by training, Tune, Serve and the quickstart."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from bigray.config import ConfigError, ScalingConfig

if TYPE_CHECKING:
    import torch


def ensure_ray() -> bool:
    """Connect to the cluster named by RAY_ADDRESS (as under `ray job submit`) or start a local one.

    Returns True when this call connected (so the caller disconnects when done).
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # The dashboard is needed: Train V2 / Tune clean up through the State API.
        ray.init(include_dashboard=True)
    return True


def check_resources(scaling: ScalingConfig) -> None:
    """Fail before training when the cluster can never fit the workers (GPUs in particular)."""
    import ray

    resources = ray.cluster_resources()
    if scaling.use_gpu and resources.get("GPU", 0) < 1 and not os.environ.get("BIGRAY_WAIT_FOR_AUTOSCALER"):
        raise ConfigError(
            "scaling.use_gpu",
            "is true but the Ray cluster has no GPUs (set scaling.use_gpu=false to train on CPUs, or "
            "BIGRAY_WAIT_FOR_AUTOSCALER=1 if the autoscaler will add GPU nodes)",
        )


def torch_device(use_gpu: bool, index: int | None = None) -> "torch.device":
    """The device this process computes on: its (local-rank) CUDA GPU when it asked for one, else the CPU.

    Ray sets CUDA_VISIBLE_DEVICES to the GPUs it gave the process, so asking without having one is
    an error that says so rather than a silent fall-back to the CPU.
    """
    import torch

    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("this process asked for a GPU (scaling.use_gpu / num_gpus) but torch sees no CUDA device")
    if index is None:
        return torch.device("cuda")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def training_precision(requested: str, device: "torch.device", fp16: bool = True) -> str:
    """The precision a worker trains in: 'auto' is bf16 on a GPU with bf16 tensor cores (compute
    capability 8.0+), else fp16 on a GPU (fp32 when the loop has no ``fp16`` path), fp32 on a CPU."""
    import torch

    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "fp32"
    if torch.cuda.get_device_capability(device)[0] >= 8:
        return "bf16"
    return "fp16" if fp16 else "fp32"


def enable_tf32(device: "torch.device") -> None:
    """fp32 matmuls and convolutions on a GPU run on TF32 tensor cores (what fp32 MFU is measured against)."""
    import torch

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
