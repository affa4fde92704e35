"""Experiment tracking: a run directory's run mirrored into MLflow or Weights & Biases.

Who does what follows Ray's documented pattern. Rank 0 opens the tracking run inside the train
function and logs the resolved config (dotted keys) as params, the system facts and run directory
as tags, and every report's metrics at its step. The driver adds what exists only after training
(summary.json, plots, the checkpoint URIs) and the final status. The tracking run's id is kept in
the run directory (``tracking.json``), so a resumed run (a worker restart, a re-run of the run name)
continues the same tracking run. Tune opens one parent run per search; each trial's run is a child
(MLflow nested runs; a W&B group).

Tracking never fails training: the first error in a process logs one warning and that process
tracks nothing more for the run; rank 0 marks the run directory so the driver does not warn again.
Credentials stay in the environment, where MLflow and W&B read them; nothing here logs or saves them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from typing import Any, Mapping, Sequence

from bigray.artifacts.storage import is_file, is_uri, join, read_text, upload, write_text
from bigray.config import ConfigError, TrackingConfig, to_dict

log = logging.getLogger(__name__)

TRACKING = "tracking.json"
"""In a run directory: the backend and id of its tracking run (what a resumed run continues)."""
PARENT_TAG = "mlflow.parentRunId"
"""The tag MLflow nests runs by (what ``mlflow.start_run(nested=True)`` sets)."""
DEFAULT_NAME = "bigray"

# MLflow retries an unreachable server for minutes by default; a run must not wait on it.
_MLFLOW_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def resolved(t: TrackingConfig, environ: Mapping[str, str] = os.environ) -> TrackingConfig:
    """``t`` with the backend, URI, experiment, project and mode filled from the trackers' own
    environment variables, as the driver sees them (workers then get explicit values)."""
    backend = t.backend
    if backend == "auto":
        if t.uri or environ.get("MLFLOW_TRACKING_URI"):
            backend = "mlflow"
        elif environ.get("WANDB_MODE") != "disabled" and (
            environ.get("WANDB_PROJECT") or environ.get("WANDB_MODE") in ("online", "offline")
        ):
            backend = "wandb"
        else:
            backend = "none"
    if backend == "none":
        return dataclasses.replace(t, backend="none")
    module = "mlflow" if backend == "mlflow" else "wandb"
    try:
        __import__(module)
    except ImportError:
        raise ConfigError(
            "tracking.backend", f"{backend!r} needs the {module} package (pip install {module})"
        ) from None
    if backend == "mlflow":
        uri = t.uri or environ.get("MLFLOW_TRACKING_URI", "")
        if not uri:
            raise ConfigError(
                "tracking.uri", "the mlflow backend needs a tracking URI: set tracking.uri or MLFLOW_TRACKING_URI"
            )
        experiment = t.experiment or environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_NAME
        return TrackingConfig(**{**to_dict(t), "backend": "mlflow", "uri": uri, "experiment": experiment})
    mode = t.mode or environ.get("WANDB_MODE", "online")
    if mode not in ("online", "offline"):
        raise ConfigError("tracking.mode", f"WANDB_MODE={mode!r}: use online or offline (or tracking.backend none)")
    project = t.project or environ.get("WANDB_PROJECT") or DEFAULT_NAME
    return TrackingConfig(**{**to_dict(t), "backend": "wandb", "project": project, "mode": mode})


def flat_params(cfg: Any) -> dict[str, str]:
    """A job config as MLflow-style params: dotted keys, values as strings (lists as JSON)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)

    walk("", to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg)
    return out


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of one report (what a tracker can plot)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def versions() -> dict[str, str]:
    """The versions that matter when comparing runs."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("bigray", "ray", "torch", "deepspeed"):
        try:
            out[f"{package}_version"] = version(package)
        except PackageNotFoundError:
            pass
    return out


def read_state(run_dir: str) -> dict[str, Any]:
    """What ``tracking.json`` says of a run directory's tracking run (empty if nothing was tracked)."""
    path = join(run_dir, TRACKING)
    try:
        return json.loads(read_text(path)) if is_file(path) else {}
    except (ValueError, OSError) as e:
        log.warning("tracking: ignoring unreadable %s (%s); a new tracking run starts", path, e)
        return {}


def continue_tracking(from_dir: str, to_dir: str) -> None:
    """Make the run in ``to_dir`` continue the tracking run of ``from_dir`` (a Tune trial restored
    from a checkpoint trains on in a new run directory, but stays one tracking run)."""
    source, target = join(from_dir, TRACKING), join(to_dir, TRACKING)
    if is_file(source) and not is_file(target):
        write_text(target, read_text(source))


def _where(t: TrackingConfig) -> str:
    return t.uri if t.backend == "mlflow" else t.project


class TrackedRun:
    """One process's handle on a run's tracking run. Every method is safe to call: a tracker error
    logs one warning and turns tracking off for this handle (training goes on)."""

    def __init__(self, t: TrackingConfig, run_dir: str, files_dir: str | None = None):
        self.t, self.run_dir = t, run_dir
        self.files_dir = files_dir or ("" if is_uri(run_dir) else run_dir)
        """Where the tracker's local files go (W&B's ``wandb/``): the run directory, or a local mirror
        uploaded to it (made when W&B opens, for a run directory in storage)."""
        self.session: Any = None
        self.run_id = ""
        """The tracking run's id once opened (kept after :meth:`close`)."""
        self.lost: str = ""

    @property
    def active(self) -> bool:
        return self.session is not None

    # ------------------------------------------------------------------ opening

    @classmethod
    def start(
        cls,
        t: TrackingConfig,
        run_dir: str,
        run_name: str,
        params: dict[str, str],
        tags: dict[str, str],
        files_dir: str | None = None,
    ) -> TrackedRun:
        """Open (or, when the run directory names one, continue) the tracking run: rank 0 at the start of training."""
        run = cls(t, run_dir, files_dir)
        if t.backend in ("none", "auto"):
            return run
        state = read_state(run_dir)
        same = state.get("backend") == t.backend and state.get("where") == _where(t)
        resume_id = state.get("run_id") if same else None
        all_tags = {**t.tags, **tags, "bigray.run_dir": run_dir}
        if t.parent_run:
            all_tags[PARENT_TAG] = t.parent_run
        if run._guard("open the run", lambda: run._open(t.run_name or run_name, resume_id, all_tags)):
            run.call("log the params", lambda s: s.params(params, resumed=bool(resume_id)))
            if run.active:
                write_text(
                    join(run_dir, TRACKING),
                    json.dumps({"backend": t.backend, "where": _where(t), "run_id": run.run_id}) + "\n",
                )
                log.info("tracking: %s run %s%s", t.backend, run.run_id, " (resumed)" if resume_id else "")
        return run

    @classmethod
    def reopen(cls, t: TrackingConfig, run_dir: str) -> TrackedRun:
        """The tracking run rank 0 left in ``run_dir``, for the driver's last words (nothing if none,
        or if rank 0 already lost the tracker and warned)."""
        run = cls(t, run_dir)
        if t.backend in ("none", "auto"):
            return run
        state = read_state(run_dir)
        if not state.get("run_id") or state.get("lost") or state.get("backend") != t.backend:
            return run
        run._guard("reopen the run", lambda: run._open(None, state["run_id"], {}))
        return run

    @classmethod
    def search(cls, t: TrackingConfig, run_dir: str, run_name: str, params: dict[str, str]) -> TrackedRun:
        """The parent run of a Tune search (continued when the search is resumed)."""
        return cls.start(t, run_dir, run_name, params, {"bigray.kind": "search"})

    def _open(self, run_name: str | None, run_id: str | None, tags: dict[str, str]) -> None:
        if self.t.backend == "mlflow":
            self.session = _MLflowSession(self.t, run_name, run_id, tags)
        else:
            self.files_dir = self.files_dir or tempfile.mkdtemp(prefix="bigray-wandb-")
            self.session = _WandbSession(self.t, run_name, run_id, tags, self.files_dir)
        self.run_id = self.session.run_id

    # ------------------------------------------------------------------ logging

    def _guard(self, doing: str, fn: Any) -> bool:
        try:
            fn()
            return True
        except Exception as e:  # noqa: BLE001 - any tracker failure is reported once, never raised
            self.lost = (
                f"could not {doing} on {self.t.backend} ({_where(self.t)}): {type(e).__name__}: {str(e).strip()[:300]}"
            )
            log.warning("tracking: %s; training goes on without tracking", self.lost)
            self.session = None
            return False

    def call(self, doing: str, fn: Any) -> None:
        """Run ``fn(session)`` unless tracking is off; a failure turns it off with one warning."""
        if self.session is not None:
            session = self.session
            self._guard(doing, lambda: fn(session))

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        values = numeric(metrics)
        if values:
            self.call("log metrics", lambda s: s.metrics(values, step))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        clean = {k: str(v) for k, v in tags.items() if v is not None}
        self.call("set tags", lambda s: s.tags(clean))

    def log_files(self, paths: Sequence[str]) -> None:
        present = [p for p in paths if p and os.path.isfile(p)]
        if present:
            self.call("upload files", lambda s: s.files(present))

    def close(self, status: str | None = "FINISHED") -> None:
        """End this handle: ``status`` FINISHED/FAILED ends the run; None leaves it open for another process."""
        self.call("close the run", lambda s: s.end(status))
        self.session = None
        if self.files_dir and is_uri(self.run_dir) and os.path.isdir(os.path.join(self.files_dir, "wandb")):
            upload(os.path.join(self.files_dir, "wandb"), join(self.run_dir, "wandb"))
        if self.lost:  # only a session that was tried can be lost
            state = read_state(self.run_dir)
            if state:
                write_text(join(self.run_dir, TRACKING), json.dumps({**state, "lost": self.lost}) + "\n")


def record_outcome(
    t: TrackingConfig,
    run_dir: str,
    status: str | None,
    tags: Mapping[str, Any] | None = None,
    files: Sequence[str] = (),
    texts: Mapping[str, str] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> None:
    """The driver's last words on a run: tags (checkpoint URIs), ``metrics`` (a search's best value),
    files (plots) and ``texts`` (name -> content, e.g. summary.json) attached, then ``status``
    (FINISHED, FAILED or KILLED; None leaves it as it is). Nothing happens without a tracking run."""
    run = TrackedRun.reopen(t, run_dir)
    if not run.active:
        return
    run.set_tags(tags or {})
    run.log_metrics(metrics or {}, step=0)
    staged = []
    if texts:
        folder = tempfile.mkdtemp(prefix="bigray-tracking-")
        for name, text in texts.items():
            staged.append(os.path.join(folder, name))
            with open(staged[-1], "w") as f:
                f.write(text)
    run.log_files([*files, *staged])
    run.close(status)


# ----------------------------------------------------------------------------- backends


class _MLflowSession:
    """A run through ``MlflowClient`` (explicit run ids: no global active run shared with user code)."""

    def __init__(self, t: TrackingConfig, run_name: str | None, run_id: str | None, tags: dict[str, str]):
        for key, value in _MLFLOW_HTTP.items():
            os.environ.setdefault(key, value)
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=t.uri)
        if run_id:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            self.tags(tags)
            return
        experiment = self.client.get_experiment_by_name(t.experiment)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(t.experiment)
            except Exception:  # noqa: BLE001 - another trial created it first
                experiment_id = self.client.get_experiment_by_name(t.experiment).experiment_id
        else:
            experiment_id = experiment.experiment_id
        self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id

    def params(self, params: dict[str, str], resumed: bool) -> None:
        from mlflow.entities import Param

        if resumed:  # params are immutable in MLflow: a resumed run adds only new keys
            have = self.client.get_run(self.run_id).data.params
            changed = sorted(k for k, v in params.items() if k in have and have[k] != v[:6000])
            if changed:
                log.info("tracking: resumed run keeps its first values of %s", ", ".join(changed))
            params = {k: v for k, v in params.items() if k not in have}
        items = [Param(k[:250], v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v[:5000]) for k, v in tags.items()])

    def files(self, paths: list[str]) -> None:
        for p in paths:
            self.client.log_artifact(self.run_id, p)

    def end(self, status: str | None) -> None:
        if status:
            self.client.set_terminated(self.run_id, status)


class _WandbSession:
    """A W&B run (``wandb.init`` with an explicit id and ``resume="allow"``), its files under ``files_dir``."""

    def __init__(
        self, t: TrackingConfig, run_name: str | None, run_id: str | None, tags: dict[str, str], files_dir: str
    ):
        import wandb

        self.files_dir = files_dir
        self.run = wandb.init(
            project=t.project,
            name=run_name,
            id=run_id,
            resume="allow",
            group=t.experiment or None,
            mode=t.mode,
            dir=files_dir,
            tags=[f"{k}={v}"[:64] for k, v in t.tags.items()] or None,
            reinit="create_new",
            settings=wandb.Settings(console="off", silent=True),
        )
        self.run_id = self.run.id
        self.tags(tags)

    def params(self, params: dict[str, str], resumed: bool) -> None:
        self.run.config.update(params, allow_val_change=True)

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def tags(self, tags: dict[str, str]) -> None:
        if tags:
            self.run.config.update({f"tag.{k}": v for k, v in tags.items()}, allow_val_change=True)

    def files(self, paths: list[str]) -> None:
        for p in paths:
            self.run.save(p, base_path=os.path.dirname(p), policy="now")

    def end(self, status: str | None) -> None:
        self.run.finish(exit_code=1 if status == "FAILED" else 0)
