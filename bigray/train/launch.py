"""The thin Ray Train layer: connect to Ray, build a TorchTrainer from a typed config, run it.

Everything a job needs from Ray is here: resources, storage path and run name, checkpoint
retention by a validation metric, and the failure budget. The loops themselves live next door.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from bigray.config import ConfigError, RunConfig, ScalingConfig, to_dict
from bigray.runs import run_dir, save_resolved_config, storage_root

log = logging.getLogger(__name__)


class TrainingFailed(RuntimeError):
    """The Ray Train run ended in error; the message holds the workers' error."""


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


@dataclass
class TrainOutcome:
    run_dir: str
    checkpoint: str | None
    best_checkpoint: str | None
    metrics: dict[str, Any]


def loop_for(kind: str) -> Callable[[dict[str, Any]], None]:
    """The Ray Train worker function of a trainer kind ("gpt" or "resnet")."""
    if kind == "gpt":
        from bigray.train.gpt import ray_train_loop
    else:
        from bigray.train.resnet import ray_train_loop
    return ray_train_loop


def build_trainer(
    loop: Callable[[dict[str, Any]], None],
    job_config: Any,
    scaling: ScalingConfig,
    run: RunConfig,
    metric: str,
    mode: str,
    callbacks: Sequence[Any] = (),
) -> Any:
    """A TorchTrainer for ``loop`` with resources, storage, checkpoint retention and failure budget."""
    import ray.train
    from ray.train.torch import TorchTrainer

    directory = run_dir(run.storage_path, run.name)
    save_resolved_config(directory, job_config)
    return TorchTrainer(
        train_loop_per_worker=loop,
        train_loop_config={"job": to_dict(job_config), "run_dir": directory},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=run.name,
            storage_path=storage_root(run.storage_path),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=run.keep_checkpoints,
                checkpoint_score_attribute=metric,
                checkpoint_score_order=mode,
            ),
            failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
            callbacks=list(callbacks),
        ),
    )


def fit(
    loop: Callable[[dict[str, Any]], None],
    job_config: Any,
    scaling: ScalingConfig,
    run: RunConfig,
    metric: str,
    mode: str,
) -> TrainOutcome:
    """Run ``loop`` on ``scaling.num_workers`` Ray Train workers and return where things ended up."""
    import ray.train

    started = ensure_ray()
    check_resources(scaling)
    directory = run_dir(run.storage_path, run.name)
    trainer = build_trainer(loop, job_config, scaling, run, metric, mode)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise TrainingFailed(f"training run {run.name} failed: {e}") from None
    finally:
        if started:
            ray.shutdown()  # flushes worker logs, so the summary line printed next is the last one
    best = result.get_best_checkpoint(metric, mode) if result.best_checkpoints else None
    return TrainOutcome(
        run_dir=directory,
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        best_checkpoint=best.path if best else None,
        metrics=dict(result.metrics or {}),
    )
