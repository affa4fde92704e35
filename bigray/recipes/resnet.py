"""ResNet training, driver side: pin and check the image data and the resume checkpoint, then launch."""

from __future__ import annotations

import dataclasses
from typing import Any

from bigray.artifacts.checkpoint import read_meta
from bigray.artifacts.locate import resolve_checkpoint
from bigray.config import ResNetJobConfig
from bigray.data.images import load_images, with_absolute_root
from bigray.recipes.launch import JobKind, PreparedJob, in_run_dir, launch, resuming
from bigray.train.context import LocalContext
from bigray.train.resnet import KIND, check_resume_compatible, resnet_loop, run_local


def prepare_resnet(cfg: ResNetJobConfig) -> PreparedJob:
    """Find (or download) the images once and pin their root; workers then read it with downloads off."""
    cfg = dataclasses.replace(cfg, data=with_absolute_root(cfg.data))
    load_images(cfg.data)  # fail fast on a bad data root, before any Ray work
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, download=False))
    if cfg.resume_from:
        cfg = dataclasses.replace(cfg, resume_from=resolve_checkpoint(cfg.resume_from))
    with resuming(cfg, KIND) as ckpt:
        if ckpt is not None:
            check_resume_compatible(read_meta(ckpt, KIND), cfg)
    return PreparedJob(config=cfg)


def _progress(metrics: dict[str, Any], cfg: ResNetJobConfig) -> tuple[int, int]:
    return int(metrics.get("epoch", 0)), cfg.train.epochs


RESNET = JobKind("resnet", ResNetJobConfig, prepare_resnet, resnet_loop, "val/acc", "max", lambda cfg: cfg.train.epochs, _progress)


def train_resnet(cfg: ResNetJobConfig) -> dict[str, Any]:
    """`bigray train-resnet`: check data and checkpoint on the driver, then train on Ray."""
    return launch(RESNET, cfg)


def train_local(cfg: ResNetJobConfig, run_dir: str) -> tuple[dict[str, Any], LocalContext]:
    """Prepare and train in this process without Ray (world size 1)."""
    prepared = prepare_resnet(in_run_dir(cfg, run_dir))
    return run_local(prepared.config, run_dir)
