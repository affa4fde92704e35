"""ResNet training, driver side: pin and check the image data and the resume checkpoint, then launch."""

from __future__ import annotations

import dataclasses
from typing import Any

from bigray.artifacts.checkpoint import CheckpointError, CheckpointMeta
from bigray.artifacts.locate import resolve_checkpoint
from bigray.config import ConfigError, ResNetJobConfig, from_dict
from bigray.data.images import load_images, with_absolute_root
from bigray.recipes.launch import JobKind, PreparedJob, in_run_dir, launch, resuming
from bigray.train.context import LocalContext
from bigray.train.resnet import KIND, resnet_loop, run_local


def check_resume_compatible(meta: CheckpointMeta, cfg: ResNetJobConfig) -> None:
    """Refuse a checkpoint of another architecture, saying which."""
    try:
        saved = from_dict(ResNetJobConfig, meta.config)
    except ConfigError as e:
        raise CheckpointError(f"cannot resume: the checkpoint's config is not a ResNet job's ({e})") from None
    if saved.model.arch != cfg.model.arch or saved.model.small_input_stem != cfg.model.small_input_stem:
        raise CheckpointError(
            f"cannot resume from this checkpoint: it is {saved.model.arch} (small stem {saved.model.small_input_stem}), "
            f"this run {cfg.model.arch} (small stem {cfg.model.small_input_stem})"
        )


def prepare_resnet(cfg: ResNetJobConfig) -> PreparedJob:
    """Find (or download) the images once and pin their root; workers then read it with downloads off."""
    batch, scaling = cfg.train.global_batch_size, cfg.scaling
    scaling.require_global_batch(batch)
    for workers in scaling.world_sizes():
        if batch % workers:
            over = (
                f"{workers} workers (scaling.num_workers {scaling.num_workers})"
                if scaling.elastic
                else f"scaling.num_workers ({workers})"
            )
            raise ConfigError(
                "train.global_batch_size", f"{batch} images do not split over {over}: each worker takes an equal share"
            )
    cfg = dataclasses.replace(cfg, data=with_absolute_root(cfg.data))
    load_images(cfg.data)  # fail fast on a bad data root, before any Ray work
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, download=False))
    if cfg.resume_from:
        cfg = dataclasses.replace(cfg, resume_from=resolve_checkpoint(cfg.resume_from))
    with resuming(cfg, KIND) as meta:
        if meta is not None:
            check_resume_compatible(meta, cfg)
    return PreparedJob(config=cfg)


def _progress(metrics: dict[str, Any], cfg: ResNetJobConfig) -> tuple[int, int]:
    return int(metrics.get("epoch", 0)), cfg.train.epochs


RESNET = JobKind(
    "resnet", ResNetJobConfig, prepare_resnet, resnet_loop, "val/acc", "max", lambda cfg: cfg.train.epochs, _progress
)


def train_resnet(cfg: ResNetJobConfig) -> dict[str, Any]:
    """`bigray train-resnet`: check data and checkpoint on the driver, then train on Ray."""
    return launch(RESNET, cfg)


def train_local(cfg: ResNetJobConfig, run_dir: str) -> tuple[dict[str, Any], LocalContext]:
    """Prepare and train in this process without Ray (world size 1)."""
    prepared = prepare_resnet(in_run_dir(cfg, run_dir))
    return run_local(prepared.config, run_dir)
