"""`bigray cluster check`: what would fail a job on this cluster after its GPU nodes boot, found first.

Run as a Ray job on the cluster (`ray job submit -- bigray cluster check --config JOB.yaml`), so every
probe has what the job's workers will have: their node, image and credentials. Checked:

- every node that is up runs the driver's Python, Ray, torch and bigray (one image everywhere);
- each location the job's workers open (run.storage_path, data.cache_dir, data.root, ...) is written
  by the driver and read back from every node, with that node's credentials; a local path must be
  one every node sees (the driver's refusal of node-local paths is part of the check);
- the job's ``scaling.accelerator_type`` is offered by a node that is up or a node type the
  autoscaler can add, and the cluster can hold the job's workers.

Nodes the autoscaler has not started yet are not probed (they run the same image): the report says so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bigray.artifacts.storage import StorageError, absolute, is_uri, join, read_text, write_text
from bigray.cluster import ensure_ray, worker_bundle, workers_fitting_at_most, workers_fitting_now
from bigray.config import ConfigError, TuneJobConfig, load_config
from bigray.recipes import JOBS
from bigray.recipes.launch import check_shared_locations, worker_locations

log = logging.getLogger(__name__)

MARKER_DIR = ".bigray-cluster-check"
"""Where the check writes its marker files, inside each location (removed afterwards where possible)."""


class ClusterCheckFailed(RuntimeError):
    """At least one check failed; the message lists them."""


@dataclass
class Finding:
    check: str
    ok: bool
    detail: str


def versions() -> dict[str, str]:
    """What this process runs: the versions every node must share."""
    import importlib.metadata

    import ray
    import torch

    return {"python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__,
            "bigray": importlib.metadata.version("bigray")}  # fmt: skip


def _marker(location: str, name: str) -> str:
    return join(location, MARKER_DIR, name) if is_uri(location) else str(Path(location).expanduser().resolve() / MARKER_DIR / name)


def _write(location: str, name: str, text: str) -> None:
    if is_uri(location):
        write_text(_marker(location, name), text)
    else:
        path = Path(_marker(location, name))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _read(location: str, name: str) -> str:
    return read_text(_marker(location, name)) if is_uri(location) else Path(_marker(location, name)).read_text()


def probe_node(locations: dict[str, str], nonce: str) -> dict[str, Any]:
    """On one node: its versions, and for each location whether the driver's marker reads back and
    this node can write its own (its credentials, its view of the path)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    seen: dict[str, str] = {}
    for key, location in locations.items():
        try:
            found = _read(location, f"driver-{nonce}")
            if found != nonce:
                raise StorageError(f"the driver's marker holds {found!r}")
            _write(location, f"node-{nonce}-{node}", node)
            seen[key] = "ok"
        except (OSError, StorageError) as e:
            seen[key] = f"{type(e).__name__}: {e}"
    return {"node": node, "versions": versions(), "locations": seen}


def _offered_accelerators() -> set[str]:
    """Accelerator types of the nodes that are up and of the node types the autoscaler published."""
    import ray
    import ray._private.state

    names = {k for n in ray.nodes() if n.get("Alive") for k in n["Resources"]}
    config = ray._private.state.state.get_cluster_config()
    if config is not None:
        names |= {k for group in config.node_group_configs for k in group.resources}
    return {k.split(":", 1)[1] for k in names if k.startswith("accelerator_type:")}


def job_config(path: str, overrides: list[str]) -> Any:
    """The typed config of a job YAML, whichever command runs it (Tune, GPT pretraining or
    fine-tuning, ResNet): the first config class that accepts every key."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    classes = [TuneJobConfig] if "tune" in raw else [kind.config_class for kind in JOBS.values()]
    errors = []
    for cls in classes:
        try:
            return load_config(cls, path, overrides)
        except ConfigError as e:
            errors.append(f"{cls.__name__}: {e}")
    raise ConfigError("", f"{path} is no job config bigray knows ({'; '.join(errors)})")


def check(cfg: Any | None, timeout_s: float = 300.0) -> list[Finding]:
    """Every check against the connected cluster, for the job ``cfg`` (None: versions only)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    findings: list[Finding] = []
    trainer = cfg.trainer_config() if isinstance(cfg, TuneJobConfig) else cfg
    locations = worker_locations(cfg) if cfg is not None else {}
    try:
        check_shared_locations(locations)
        findings.append(Finding("locations shared", True, ", ".join(f"{k}={v}" for k, v in locations.items()) or "no job given"))
    except ConfigError as e:
        findings.append(Finding("locations shared", False, str(e)))
    nonce = uuid.uuid4().hex[:12]
    written = {}
    for key, location in locations.items():
        if not location:
            continue
        try:
            location = absolute(location)  # probes run in their own cwd
            _write(location, f"driver-{nonce}", nonce)
            written[key] = location
        except (OSError, StorageError) as e:
            findings.append(Finding(f"{key} writable from the driver", False, f"{location}: {e}"))

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    probe = ray.remote(num_cpus=0)(probe_node)
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(written, nonce) for n in nodes]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    reports = [ray.get(r) for r in ready]
    mine = versions()
    findings.append(Finding("nodes answered", len(reports) == len(nodes), f"{len(reports)} of {len(nodes)} nodes up (nodes the autoscaler adds later are not probed)"))
    for report in reports:
        node = report["node"][:12]
        differs = {k: v for k, v in report["versions"].items() if v != mine[k]}
        findings.append(Finding(f"node {node} versions", not differs,
                                "same as the driver: " + json.dumps(mine) if not differs else f"differs from the driver {json.dumps(mine)}: {json.dumps(differs)}"))  # fmt: skip
        for key, seen in report["locations"].items():
            findings.append(Finding(f"node {node} reads and writes {key}", seen == "ok", f"{written[key]}: {seen}"))

    if trainer is not None:
        scaling = trainer.scaling
        if scaling.accelerator_type:
            offered = _offered_accelerators()
            findings.append(Finding("accelerator type offered", scaling.accelerator_type in offered,
                                    f"the job asks for {scaling.accelerator_type}; nodes and node types offer {sorted(offered) or 'none'}"))  # fmt: skip
        bundle = worker_bundle(scaling)
        most = workers_fitting_at_most(bundle)
        now = workers_fitting_now(bundle)
        enough = max(now, most or 0) >= scaling.num_workers
        findings.append(Finding("workers fit", enough, f"{scaling.num_workers} workers of {bundle}: {now} fit now, "
                                                       f"{'no autoscaler' if most is None else f'{most} at most'}"))  # fmt: skip
    for location in written.values():  # best effort: object stores and disks keep nothing of the check
        _cleanup(location)
    return findings


def _cleanup(location: str) -> None:
    try:
        if is_uri(location):
            from bigray.artifacts.storage import filesystem

            fs, path = filesystem(join(location, MARKER_DIR))
            fs.delete_dir(path)
        else:
            import shutil

            shutil.rmtree(Path(location).expanduser().resolve() / MARKER_DIR, ignore_errors=True)
    except Exception as e:  # noqa: BLE001 - leftovers are harmless; say so and go on
        log.warning("could not remove the check's markers under %s: %s", location, e)


def run(config_path: str | None, overrides: list[str]) -> dict[str, Any]:
    """`bigray cluster check`: print each finding, then a JSON summary; ClusterCheckFailed if any failed."""
    import ray

    cfg = job_config(config_path, overrides) if config_path else None
    started = ensure_ray()
    try:
        findings = check(cfg)
    finally:
        if started:
            ray.shutdown()
    for f in findings:
        print(f"{'ok  ' if f.ok else 'FAIL'}  {f.check}: {f.detail}", flush=True)
    failed = [f for f in findings if not f.ok]
    summary = {"cluster_check": "failed" if failed else "passed", "findings": [dataclasses.asdict(f) for f in findings]}
    print(json.dumps(summary), flush=True)
    if failed:
        raise ClusterCheckFailed("; ".join(f"{f.check}: {f.detail}" for f in failed))
    return summary
