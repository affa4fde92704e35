"""The driver side of every training job: prepare once, launch a TorchTrainer, summarize.

A :class:`JobKind` says everything the driver needs about one kind of job (its config class, how
to prepare it, the worker loop, the metric that ranks its checkpoints); the CLI, Tune and the
quickstart all go through it, so a job is prepared and launched the same way everywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

from bigray.artifacts.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    latest_complete,
    read_meta,
    resizes,
    resume_point,
)
from bigray.artifacts.runs import clear_failure, recorded_failure, save_resolved_config
from bigray.artifacts.runs import finish as finish_run
from bigray.artifacts.storage import absolute, full_uri, run_dir
from bigray.artifacts.tracking import record_outcome, resolved
from bigray.cluster import ensure_ray, wait_for_workers
from bigray.config import ScalingConfig, to_dict
from bigray.recipes.preflight import check_nodes, check_shared_locations, worker_locations

log = logging.getLogger(__name__)


class TrainingFailed(RuntimeError):
    """The Ray Train run ended in error; the message holds the workers' error."""


@dataclass
class PreparedJob:
    """A job checked and prepared on the driver: what every worker is handed."""

    config: Any
    """The typed job config with paths made absolute and the resume checkpoint resolved."""
    data_dir: str = ""
    """The prepared data cache the workers open (never rebuild); empty when the loop reads its data config."""


@dataclass(frozen=True)
class JobKind:
    """One kind of training job, as the driver sees it."""

    name: str
    config_class: type
    prepare: Callable[[Any], PreparedJob]
    """Check everything that can be checked without workers and build the data, once."""
    loop: Callable[[dict[str, Any]], None]
    """Ray Train's train_loop_per_worker: ``{"job", "run_dir", "data_dir"}`` in."""
    metric: str
    """The validation metric checkpoints are ranked by."""
    mode: Literal["min", "max"]
    reports: Callable[[Any], int]
    """How many validation reports a full run makes (ASHA's max_t)."""
    progress: Callable[[dict[str, Any], Any], tuple[int, int]]
    """(reached, goal) of a run from its last metrics, in the job's own units."""
    for_search: Callable[[Any], Any] = lambda cfg: cfg
    """The config a Tune trial runs (e.g. every report carries the metric the scheduler compares)."""


@contextlib.contextmanager
def resuming(cfg: Any, kind_name: str) -> Iterator[CheckpointMeta | None]:
    """The metadata of the checkpoint a launch of ``cfg`` will continue from (None for a fresh start),
    for the job kind to check against the job before any worker starts. It is chosen by
    checkpoint.resume_point, the rule every worker follows, so the driver checks the one they load.
    A broken or incompatible checkpoint fails here, once, with the reason; when it is the run's own
    (re-running a run name resumes it), the error says how to start over."""
    directory = run_dir(cfg.run.storage_path, cfg.run.name)
    own = latest_complete(directory, kind_name)
    ckpt = resume_point(own, cfg.resume_from, directory, kind_name)
    try:
        yield read_meta(ckpt, kind_name) if ckpt else None
    except CheckpointError as e:
        if ckpt is None or ckpt != own:
            raise
        raise CheckpointError(
            f"run.name {cfg.run.name!r} already holds {own} (re-running a run name resumes it): {e}; pick a new run.name to start over"
        ) from None


def in_run_dir(cfg: Any, directory: str) -> Any:
    """``cfg`` with run.storage_path and run.name naming ``directory`` (a local run's own directory)."""
    p = Path(directory).expanduser().resolve()
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, storage_path=str(p.parent), name=p.name))


@dataclass
class TrainOutcome:
    run_dir: str
    checkpoint: str | None
    best_checkpoint: str | None
    metrics: dict[str, Any]
    segments: list[dict[str, Any]] | None = None
    """The final checkpoint's run segments: each stretch trained between two starts, with its world size."""


def train_scaling(scaling: ScalingConfig) -> Any:
    """Ray Train's ScalingConfig for bigray's scaling section (the bundle cluster.worker_bundle checks)."""
    import ray.train

    return ray.train.ScalingConfig(
        num_workers=(scaling.min_workers, scaling.max_workers) if scaling.elastic else scaling.num_workers,
        elastic_resize_monitor_interval_s=scaling.resize_interval_s,
        use_gpu=scaling.use_gpu,
        resources_per_worker={"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})},
        accelerator_type=scaling.accelerator_type or None,
    )


def build_trainer(kind: JobKind, prepared: PreparedJob, callbacks: Sequence[Any] = ()) -> Any:
    """A TorchTrainer for a prepared job: resources, storage, checkpoint retention and failure budget."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = prepared.config
    scaling, run = cfg.scaling, cfg.run
    directory = run_dir(run.storage_path, run.name)
    save_resolved_config(directory, cfg)
    clear_failure(directory)
    return TorchTrainer(
        train_loop_per_worker=kind.loop,
        # submitted_at: the workers log how long Ray Train took to start them (their start-up line)
        train_loop_config={
            "job": to_dict(cfg),
            "run_dir": directory,
            "data_dir": prepared.data_dir,
            "submitted_at": time.time(),
        },
        scaling_config=train_scaling(scaling),
        run_config=ray.train.RunConfig(
            name=run.name,
            storage_path=absolute(run.storage_path),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=run.keep_checkpoints,
                checkpoint_score_attribute=kind.metric,
                checkpoint_score_order=kind.mode,
            ),
            # an elastic run continues on the workers a lost node leaves: a retry, whatever run.max_failures says
            failure_config=ray.train.FailureConfig(
                max_failures=-1 if scaling.elastic and not run.max_failures else run.max_failures
            ),
            callbacks=list(callbacks),
        ),
    )


def run_training(kind: JobKind, prepared: PreparedJob) -> TrainOutcome:
    """Run a prepared job on its Ray Train workers (Ray connected) and return where things ended up;
    a failure is recorded in the job's tracking run."""
    import ray.train

    cfg = prepared.config
    check_nodes(cfg)  # the nodes that are up run this image and reach every location
    wait_for_workers(cfg.scaling)
    directory = run_dir(cfg.run.storage_path, cfg.run.name)
    trainer = build_trainer(kind, prepared)
    try:
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            raise TrainingFailed(f"training run {cfg.run.name} failed: {e}") from None
        raise_recorded_failure(cfg)
    except TrainingFailed:
        record_outcome(cfg.tracking, directory, "FAILED")
        raise
    best = result.get_best_checkpoint(kind.metric, kind.mode) if result.best_checkpoints else None
    checkpoint = full_uri(cfg.run.storage_path, result.checkpoint.path) if result.checkpoint else None
    return TrainOutcome(
        run_dir=directory,
        checkpoint=checkpoint,
        best_checkpoint=full_uri(cfg.run.storage_path, best.path) if best else None,
        metrics=dict(result.metrics or {}),
        segments=read_meta(checkpoint).segments if checkpoint else None,
    )


def raise_recorded_failure(cfg: Any) -> None:
    """Raise TrainingFailed if the workers stopped the run on a failure a retry cannot fix."""
    reason = recorded_failure(run_dir(cfg.run.storage_path, cfg.run.name))
    if reason:
        raise TrainingFailed(f"training run {cfg.run.name} failed (not retried): {reason}")


def prepare(kind: JobKind, cfg: Any) -> PreparedJob:
    """The driver's preparation of a job: locations checked against the cluster, tracking resolved
    from the driver's environment (so every worker tracks to the same place), then the kind's own
    checks and data."""
    check_shared_locations(worker_locations(cfg))
    return kind.prepare(dataclasses.replace(cfg, tracking=resolved(cfg.tracking)))


def launch(kind: JobKind, cfg: Any) -> dict[str, Any]:
    """A training command end to end: prepare on the driver, train on Ray, write and print the summary."""
    import ray

    # A running cluster (RAY_ADDRESS: `ray job submit`) is joined first: its nodes decide which
    # locations work. A local Ray is one node, so a bad job is refused before it starts.
    t0 = time.perf_counter()
    started = ensure_ray() if os.environ.get("RAY_ADDRESS") else False
    try:
        t1 = time.perf_counter()
        prepared = prepare(kind, cfg)
        t2 = time.perf_counter()
        started = ensure_ray() or started
        log.info("start-up on the driver (s): prepare %.1f, Ray %.1f", t2 - t1, time.perf_counter() - t2 + t1 - t0)
        outcome = run_training(kind, prepared)
    finally:
        if started:
            ray.shutdown()  # flushes worker logs, so the summary line printed next is the last one
    return finish(prepared, outcome)


def launch_prepared(kind: JobKind, prepared: PreparedJob) -> dict[str, Any]:
    """Train a job already prepared (Ray connected), then write, track and print its summary."""
    return finish(prepared, run_training(kind, prepared))


def finish(prepared: PreparedJob, outcome: TrainOutcome) -> dict[str, Any]:
    """Write, track and print the summary of a finished run."""
    tags = {"bigray.checkpoint": outcome.checkpoint, "bigray.best_checkpoint": outcome.best_checkpoint}

    def record(summary: dict[str, Any]) -> None:
        record_outcome(
            prepared.config.tracking,
            outcome.run_dir,
            "FINISHED",
            tags,
            texts={"summary.json": json.dumps(summary, indent=2)},
        )

    return finish_run(
        outcome.run_dir,
        outcome.checkpoint,
        outcome.metrics,
        record,
        best_checkpoint=outcome.best_checkpoint,
        segments=outcome.segments,
        resizes=resizes(outcome.segments or []),
    )
