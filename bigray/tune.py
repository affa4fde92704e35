"""Hyperparameter search with Ray Tune over either trainer (Ray Train V2 pattern).

Each trial runs :func:`trial_driver`, a Tune function trainable that builds and runs its own
TorchTrainer (a Trainer cannot be passed to a Tuner in Train V2); a Train callback forwards rank 0's
reports and checkpoints to it, and it reports both to Tune, so ASHA can stop a trial between reports
and PBT can copy one trial's checkpoint into another. Trial runs are named after the trial id (and
the checkpoint they started from), so a resumed search continues each unfinished trial.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from ray.train.v2.api.callback import UserCallback
from ray.tune import Callback

from bigray.artifacts.checkpoint import CheckpointError, is_complete
from bigray.artifacts.runs import finish, save_resolved_config
from bigray.artifacts.storage import (
    absolute,
    full_uri,
    is_file,
    join,
    name_of,
    read_bytes,
    read_text,
    run_dir,
    write_text,
)
from bigray.artifacts.tracking import TrackedRun, continue_tracking, flat_params, record_outcome, resolved
from bigray.artifacts.tune_state import check_state, digest, is_state_file, sign
from bigray.cluster import ensure_ray, worker_bundle, workers_fitting_at_most, workers_fitting_now
from bigray.config import ConfigError, TuneJobConfig, from_dict, set_dotted, to_dict
from bigray.data.cache import sha256_file
from bigray.recipes import JOBS
from bigray.recipes.launch import JobKind, build_trainer, raise_recorded_failure
from bigray.recipes.preflight import check_nodes, check_shared_locations, worker_locations

log = logging.getLogger(__name__)

PARAMS = "params"
CHECKPOINT_PATH = "checkpoint_path"  # the Train checkpoint of a report, as TuneReportCallback names it
# The trial driver only waits on its TorchTrainer; its workers reserve the real resources.
DRIVER_CPU = 0.01


def search_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The YAML search space as Tune domains, keyed by dotted trainer key."""
    from ray import tune

    domains: dict[str, Any] = {}
    for key, spec in space.items():
        kind, args = next(iter(spec.items()))
        if kind in ("loguniform", "uniform", "randint"):
            if not (isinstance(args, list) and len(args) == 2):
                raise ConfigError(f"tune.space.{key}", f"{kind} takes [low, high], got {args!r}")
            domains[key] = getattr(tune, kind)(*args)
        elif kind == "choice":
            domains[key] = tune.choice(list(args))
        else:
            domains[key] = tune.grid_search(list(args))
    return domains


def pbt_mutations(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """PBT resamples from the same domains; a grid has no distribution to resample, so it is refused."""
    grids = [k for k, spec in space.items() if "grid" in spec]
    if grids:
        raise ConfigError(f"tune.space.{grids[0]}", "PBT needs a distribution or a choice to mutate, not a grid")
    if not space:
        raise ConfigError("tune.space", "PBT needs at least one hyperparameter to mutate")
    return search_space(space)


def trial_config(base: dict[str, Any], params: dict[str, Any], kind: JobKind, trials_dir: str, trial_id: str) -> Any:
    """The typed trainer config of one trial: base config + sampled values + a trial-id run name."""
    data = copy.deepcopy(base)
    for key, value in params.items():
        set_dotted(data, key, value)
    cfg = from_dict(kind.config_class, data, prefix="trainer")
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=f"trial_{trial_id}", storage_path=trials_dir))


WRITTEN: dict[str, str] = {}
"""sha256 of the state files this process wrote to the search directory itself (tuner.pkl, tune_job.json)."""


def trust_written(directory: str) -> None:
    """Record the digests of the search's own files, just written (or just checked by a resume)."""
    WRITTEN.update({name: digest(read_bytes(join(directory, name))) for name in ("tuner.pkl", "tune_job.json")})


class SignState(Callback):
    """Signs the search's state each time Tune saves it: Tune asks every callback for its state right
    after writing the experiment and searcher state into its staging directory, which it then
    uploads whole, so the manifest travels with the files it lists (artifacts/tune_state.py)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.staging: str | None = None

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if trials and self.staging is None:
            self.staging = trials[0].storage.experiment_driver_staging_path

    def get_state(self) -> dict[str, Any] | None:
        staging = self.staging or self._newest_staging()
        if staging is not None:
            files = [p for p in Path(staging).iterdir() if p.is_file() and is_state_file(p.name)]
            staged = {p.name: sha256_file(p) for p in files}
            sign(staging, {**staged, **WRITTEN})
        return None  # nothing of this callback's own to save

    def _newest_staging(self) -> str | None:
        """Before any step (a resumed search with nothing left to run saves its state without one):
        the staging directory Tune just wrote to, where Ray Train's StorageContext puts it."""
        import glob
        import os

        from ray.train.constants import _get_ray_train_session_dir

        found = glob.glob(os.path.join(_get_ray_train_session_dir(), "*", self.name, "driver_artifacts"))
        return max(found, key=os.path.getmtime) if found else None


class ForwardReports(UserCallback):
    """A Ray Train callback, run in the trial's TrainController, that hands every report (rank 0's
    metrics and the persisted checkpoint's path) to the trial driver through a Ray queue.

    TuneReportCallback forwards metrics only; forwarding the checkpoint as well lets the driver
    report it to Tune, which PBT needs to copy a good trial's state into a bad one and which a
    resumed search restores trials from.
    """

    def __init__(self, queue: Any):
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        where = (checkpoint.path, checkpoint.filesystem) if checkpoint else (None, None)
        self.queue.put((dict(metrics[0]), *where))


def trial_driver(config: dict[str, Any]) -> None:
    """One Tune trial: run a TorchTrainer in a thread and report each of its reports to Tune."""
    import hashlib
    import threading

    import ray.tune
    from ray.util.queue import Empty, Queue

    kind = JOBS[config["kind"]]
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(config["trainer"], config[PARAMS], kind, config["trials_dir"], trial_id)
    start = ray.tune.get_checkpoint()
    if start is not None:
        # Restored by PBT (another trial's checkpoint) or by a resumed search (its own): continue
        # from it in a run of its own, named after the checkpoint so a resume finds it again.
        tag = hashlib.sha1(start.path.encode()).hexdigest()[:8]
        run = dataclasses.replace(cfg.run, name=f"{cfg.run.name}-from-{tag}")
        # one tracking run per trial
        continue_tracking(run_dir(cfg.run.storage_path, cfg.run.name), run_dir(run.storage_path, run.name))
        cfg = dataclasses.replace(cfg, run=run, resume_from=full_uri(cfg.run.storage_path, start.path))
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    trainer = build_trainer(kind, kind.prepare(cfg), callbacks=[ForwardReports(queue)])
    outcome: dict[str, BaseException] = {}

    def run_trainer() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial's thread below
            outcome["error"] = e

    thread = threading.Thread(target=run_trainer, name=f"trial-{trial_id}", daemon=True)
    thread.start()
    while thread.is_alive() or not queue.empty():
        try:
            metrics, path, filesystem = queue.get(timeout=1.0)
        except Empty:
            continue
        metrics[CHECKPOINT_PATH] = full_uri(cfg.run.storage_path, path) if path else None  # keeps s3:// (and options)
        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint(path, filesystem) if path else None)
    queue.shutdown()
    if "error" in outcome:
        raise outcome["error"]  # a crash: Tune marks the trial ERROR
    raise_recorded_failure(cfg)  # a divergence: the same


def concurrent_trials(job: TuneJobConfig, trainer_cfg: Any) -> int:
    """How many trials fit at once: from what the cluster can scale to when an autoscaler publishes
    its node types (so a search on an autoscaling cluster does not run one trial at a time), else
    from what it holds now."""
    import ray

    s = trainer_cfg.scaling
    bundle = worker_bundle(s)
    most = workers_fitting_at_most(bundle)
    if job.tune.max_concurrent_trials:
        trials = job.tune.max_concurrent_trials
        capacity = most if most is not None else workers_fitting_now(bundle)
        if s.elastic and trials * s.min_workers > capacity:  # elastic trials would wait for each other's workers
            raise ConfigError(
                "tune.max_concurrent_trials",
                f"{trials} trials of at least {s.min_workers} workers (trainer.scaling.num_workers {s.num_workers}) "
                f"can never run at once: the cluster holds at most {capacity} workers of {bundle}",
            )
        return trials
    if most is not None:  # elastic trials are counted at their largest
        return max(1, min(most, 1000) // s.max_workers)
    resources = ray.cluster_resources()
    # Each trial also holds its driver's DRIVER_CPU: 2 trials of one 1-CPU worker need 2.02 CPUs.
    fits = int(resources.get("CPU", 1) // (s.max_workers * s.cpus_per_worker + DRIVER_CPU))
    if s.use_gpu:
        fits = min(fits, int(resources.get("GPU", 0) // s.max_workers))
    return max(1, fits)


def prepare_base(job: TuneJobConfig, trials_dir: str, parent_run: str) -> dict[str, Any]:
    """The trainer config every trial starts from, prepared and checked once before any trial starts.

    Its run section points into the search's own trials directory: the trainer config's run name is
    never launched (each trial gets its own), so an earlier run of that name is nothing to resume.
    Trials track where the search does, as children of its run ``parent_run``.
    """
    kind = JOBS[job.tune.trainer]
    cfg = job.trainer_config()
    t = job.tracking
    tracking = dataclasses.replace(
        t, parent_run=parent_run, experiment=t.experiment or (job.run.name if t.backend == "wandb" else "")
    )
    cfg = dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, storage_path=trials_dir, name="base"), tracking=tracking
    )
    return to_dict(kind.for_search(kind.prepare(cfg).config))


def make_tuner(job: TuneJobConfig, base: dict[str, Any], cfg: Any, directory: str) -> Any:
    """The Tuner of a new search; ``cfg`` is ``base`` (the prepared trainer config) typed."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    t = job.tune
    kind = JOBS[t.trainer]
    scheduler: Any
    if t.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="training_iteration", max_t=kind.reports(cfg), grace_period=1, reduction_factor=2
        )
    elif t.scheduler == "pbt":
        from ray.tune.schedulers import PopulationBasedTraining

        scheduler = PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=t.perturbation_interval,
            hyperparam_mutations={PARAMS: pbt_mutations(t.space)},
        )
    else:
        scheduler = FIFOScheduler()
    concurrency = concurrent_trials(job, cfg)
    if t.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg: Any = OptunaSearch(seed=t.seed)
        max_concurrent: int | None = concurrency  # Tune wraps the searcher in a ConcurrencyLimiter
    else:
        from ray.tune.search import BasicVariantGenerator

        # Same seed, same sampled trials; the generator takes the concurrency limit itself
        # (Tune ignores max_concurrent_trials for a BasicVariantGenerator passed in).
        search_alg = BasicVariantGenerator(random_state=t.seed, max_concurrent=concurrency)
        max_concurrent = None
    param_space = {
        "kind": t.trainer,
        "trainer": base,
        "trials_dir": join(directory, "trials"),
        PARAMS: search_space(t.space),
    }
    return tune.Tuner(
        tune.with_resources(trial_driver, {"CPU": DRIVER_CPU}),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=t.metric,
            mode=t.mode,
            num_samples=t.num_samples,
            scheduler=scheduler,
            search_alg=search_alg,
            max_concurrent_trials=max_concurrent,
            time_budget_s=t.time_budget_s or None,
        ),
        run_config=tune.RunConfig(
            name=job.run.name,
            storage_path=absolute(job.run.storage_path),
            # PBT may restore any trial from any earlier report's checkpoint: keep them all.
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=None if t.scheduler == "pbt" else job.run.keep_checkpoints
            ),
            callbacks=[SignState(job.run.name)],
        ),
    )


def results_table(grid: Any, job: TuneJobConfig, cfg: Any) -> list[dict[str, Any]]:
    """One row per trial: id, sampled config, best metric, iterations, status, best checkpoint."""
    t = job.tune
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        df = result.metrics_dataframe
        best, checkpoint = None, None
        if df is not None and t.metric in df:
            scored = df[df[t.metric].notna()]
            if len(scored):
                idx = scored[t.metric].idxmin() if t.mode == "min" else scored[t.metric].idxmax()
                best = float(scored.loc[idx, t.metric])
                with_ckpt = (
                    scored[scored["checkpoint_path"].notna()] if "checkpoint_path" in scored else scored.iloc[0:0]
                )
                if len(with_ckpt):
                    cidx = with_ckpt[t.metric].idxmin() if t.mode == "min" else with_ckpt[t.metric].idxmax()
                    checkpoint = str(with_ckpt.loc[cidx, "checkpoint_path"])
        if best is None and isinstance(metrics.get(t.metric), (int, float)) and math.isfinite(metrics[t.metric]):
            # A trial PBT restored keeps only its history since the restore: use its last report.
            best, checkpoint = float(metrics[t.metric]), metrics.get(CHECKPOINT_PATH)
        iterations = int(metrics.get("training_iteration", 0))
        reached, goal = JOBS[t.trainer].progress(metrics, cfg)
        if result.error is not None:
            status = "failed"
        elif reached < goal:
            status = "stopped early"
        else:
            status = "completed"
        rows.append(
            {
                "trial_id": metrics.get("trial_id") or name_of(result.path),
                "config": json.dumps((result.config or {}).get(PARAMS, {}), sort_keys=True),
                f"best {t.metric}": best,
                "iterations": iterations,
                "status": status,
                "checkpoint": checkpoint,
                "error": (str(result.error).strip().splitlines() or [""])[-1][:200] if result.error else "",
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    cols = [c for c in rows[0] if c != "checkpoint"]
    widths = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r[c]).ljust(widths[c]) for c in cols))


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "" if v is None else str(v)


def run_search(job: TuneJobConfig, resume_dir: str | None = None) -> dict[str, Any]:
    """`bigray tune`: run (or resume) a search, print and save the table, record the best trial."""
    from ray import tune

    started = ensure_ray()
    try:
        if resume_dir:
            check_shared_locations({"--resume": resume_dir})
            directory = absolute(resume_dir)
            if not is_file(join(directory, "tune_job.json")):
                raise ConfigError("--resume", f"{directory} holds no bigray search (no tune_job.json)")
            check_state(directory)  # before anything of it is read, let alone unpickled
            saved = json.loads(read_text(join(directory, "tune_job.json")))
            job = from_dict(TuneJobConfig, saved["job"])
            base = saved["trainer"]
            base_cfg = from_dict(JOBS[job.tune.trainer].config_class, base)
            tuner = tune.Tuner.restore(
                directory, trainable=tune.with_resources(trial_driver, {"CPU": DRIVER_CPU}), resume_errored=False
            )
            trust_written(directory)
        else:
            check_shared_locations(worker_locations(job))
            directory = run_dir(job.run.storage_path, job.run.name)
            if is_file(join(directory, "tune_job.json")):
                raise ConfigError(
                    "run.name",
                    f"{directory} already holds a search; resume it with --resume {directory} or pick a new run.name",
                )
            job = dataclasses.replace(job, tracking=resolved(job.tracking))
            search_run = TrackedRun.search(job.tracking, directory, job.run.name, flat_params(job))
            search_run.close(None)  # the trials are its children; the search's outcome is recorded at the end
            if not search_run.run_id:  # no tracking, or the tracker is unreachable (warned once): trials do not try it
                job = dataclasses.replace(job, tracking=dataclasses.replace(job.tracking, backend="none"))
            base = prepare_base(job, join(directory, "trials"), search_run.run_id)
            base_cfg = from_dict(JOBS[job.tune.trainer].config_class, base)
            check_nodes(job)
            save_resolved_config(directory, job)
            write_text(join(directory, "tune_job.json"), json.dumps({"job": to_dict(job), "trainer": base}, indent=2))
            tuner = make_tuner(job, base, base_cfg, directory)
            trust_written(directory)
            sign(directory, dict(WRITTEN))
        grid = tuner.fit()
    finally:
        if started:
            import ray

            ray.shutdown()
    kind = JOBS[job.tune.trainer]
    rows = results_table(grid, job, base_cfg)
    print_table(rows)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(rows[0]) if rows else ["trial_id"])
    writer.writeheader()
    writer.writerows(rows)
    write_text(join(directory, "results.csv"), table.getvalue())
    key = f"best {job.tune.metric}"
    scored = [r for r in rows if r[key] is not None and r["status"] != "failed"]
    if not scored:
        record_outcome(job.tracking, directory, "FAILED", texts={"results.csv": table.getvalue()})
        raise RuntimeError("no trial produced the metric; see results.csv")
    # the one completeness check, before the best checkpoint is handed on
    handed = [r for r in scored if r["checkpoint"] and is_complete(r["checkpoint"])]
    for r in scored:
        if r not in handed:
            log.warning(
                "trial %s is not handed on: its checkpoint %s is missing or incomplete", r["trial_id"], r["checkpoint"]
            )
    if not handed:
        record_outcome(job.tracking, directory, "FAILED", texts={"results.csv": table.getvalue()})
        raise CheckpointError("no trial left a complete checkpoint; see results.csv")
    scored = handed
    best = (min if job.tune.mode == "min" else max)(scored, key=lambda r: r[key])
    best_config = trial_config(base, json.loads(best["config"]), kind, join(directory, "trials"), best["trial_id"])

    def record(summary: dict[str, Any]) -> None:
        track_search(job, directory, rows, best, base_cfg.tracking)
        record_outcome(
            job.tracking,
            directory,
            "FINISHED",
            {"bigray.best_trial": best["trial_id"], "bigray.best_checkpoint": best["checkpoint"]},
            texts={"results.csv": table.getvalue(), "summary.json": json.dumps(summary, indent=2)},
            metrics={f"best/{job.tune.metric}": best[key]},
        )

    trials = {r["status"]: sum(1 for x in rows if x["status"] == r["status"]) for r in rows}
    return finish(
        directory,
        best["checkpoint"],
        {job.tune.metric: best[key]},
        record,
        best_trial=best["trial_id"],
        best_config=to_dict(best_config),
        trials=trials,
    )


TRIAL_STATUS = {"completed": "FINISHED", "stopped early": "KILLED", "failed": "FAILED"}


def track_search(
    job: TuneJobConfig, directory: str, rows: list[dict[str, Any]], best: dict[str, Any], trial_tracking: Any
) -> None:
    """Each trial's tracking run gets its final status, its best metric and whether it was the search's best."""
    key = f"best {job.tune.metric}"
    for row in rows:
        record_outcome(
            trial_tracking,
            join(directory, "trials", f"trial_{row['trial_id']}"),
            TRIAL_STATUS[row["status"]],
            {"bigray.trial_id": row["trial_id"], "bigray.best_trial": str(row is best).lower()},
            metrics={f"best/{job.tune.metric}": row[key]} if row[key] is not None else None,
        )
