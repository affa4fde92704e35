"""Driver-side checks of a job against the cluster it will run on, before any node is requested.

- ``check_shared_locations`` (every launch, in ``prepare``): a placeholder (``YOUR-...``) or a path
  only this node has, on a cluster whose workers may run on other nodes, is refused at once.
- ``check_nodes`` (every launch on several nodes, before the workers are requested): each node that
  is up runs the driver's Python, Ray, torch and bigray, and reads what the driver wrote into each
  location the workers open, then writes there itself, with its own credentials.
- ``check`` (`bigray cluster check`): both, and the accelerator type and the workers' fit.

Nodes the autoscaler has not started yet cannot be probed (they run the same image).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import uuid
from dataclasses import dataclass
from typing import Any

from bigray.artifacts.hf_gpt import is_hub_id
from bigray.artifacts.storage import (
    StorageError,
    absolute,
    filesystem,
    is_uri,
    join,
    network_filesystem,
    read_text,
    write_text,
)
from bigray.cluster import (
    SHARED_FILESYSTEM_ENV,
    offered_accelerators,
    several_nodes,
    worker_bundle,
    workers_fitting_at_most,
    workers_fitting_now,
)
from bigray.config import ConfigError, TuneJobConfig

log = logging.getLogger(__name__)


def worker_locations(cfg: Any) -> dict[str, str]:
    """The locations of a job's config that processes on other nodes open: key -> value (a Tune
    search: its trainer's, with the search's own run.storage_path, where the trials go)."""
    if isinstance(cfg, TuneJobConfig):
        return {**worker_locations(cfg.trainer_config()), "run.storage_path": cfg.run.storage_path}
    found = {"run.storage_path": cfg.run.storage_path}
    for key in ("cache_dir", "root"):  # prepared text data; images (ResNet)
        if hasattr(cfg.data, key):
            found[f"data.{key}"] = getattr(cfg.data, key)
    for key in ("resume_from", "init_from"):  # a checkpoint; a base model (a directory, or a Hub id)
        value = getattr(cfg, key, "")
        hub = is_hub_id(value)  # each node fetches its own copy from the Hub
        if value and not hub and (key == "resume_from" or is_uri(value) or os.path.exists(os.path.expanduser(value))):
            found[key] = value
    return found


def node_local(location: str) -> bool:
    """Whether only this node can open ``location``: a path (or file:// URI) not on a network
    filesystem. An empty data.root is local too: each node looks on its own disk."""
    if not location:
        return True
    if is_uri(location) and not location.startswith("file://"):
        return False
    return network_filesystem(location.removeprefix("file://")) is None


def check_shared_locations(locations: dict[str, str]) -> None:
    """Refuse, before any data is prepared or any node requested, locations only this node has when
    the job's processes may run on other nodes (workers on GPU nodes would fail after booting).

    Connected to Ray only; BIGRAY_SHARED_FILESYSTEM=1 says every node mounts the same paths."""
    import ray

    for key, value in locations.items():  # cluster.yaml's and the presets' names for what the operator creates
        if "YOUR-" in value:
            raise ConfigError(
                key,
                f"{value} still holds a placeholder (YOUR-...): replace it with your own bucket or path "
                '(README "Running on a cluster")',
            )
    if not ray.is_initialized() or os.environ.get(SHARED_FILESYSTEM_ENV) == "1":
        return
    local = {key: value for key, value in locations.items() if node_local(value)}
    why = several_nodes() if local else None
    if why is None:
        return
    named = ", ".join(
        f"{key}={value!r}" if value else f"{key} (empty: each node's own disk)" for key, value in local.items()
    )
    raise ConfigError(
        next(iter(local)),
        f"the job's workers run on other nodes ({why}), which cannot see this node's "
        f"disk: {named}. Put them in object storage (s3://YOUR-BUCKET/prefix, gs://...) "
        f"or on a filesystem every node mounts, and set {SHARED_FILESYSTEM_ENV}=1 if it is one",
    )


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

    return {
        "python": platform.python_version(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "bigray": importlib.metadata.version("bigray"),
    }


def _marker(location: str, nonce: str, name: str) -> str:
    """A marker file of one check (its own folder: checks running at once never meet)."""
    return join(location, MARKER_DIR, nonce, name)


def probe_node(locations: dict[str, str], nonce: str) -> dict[str, Any]:
    """On one node: its versions, and for each location whether the driver's marker reads back and
    this node can write its own (its credentials, its view of the path)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    seen: dict[str, str] = {}
    for key, location in locations.items():
        try:
            found = read_text(_marker(location, nonce, "driver"))
            if found != nonce:
                raise StorageError(f"the driver's marker holds {found!r}")
            write_text(_marker(location, nonce, f"node-{node}"), node)
            seen[key] = "ok"
        except (OSError, StorageError) as e:
            seen[key] = f"{type(e).__name__}: {e}"
    return {"node": node, "versions": versions(), "locations": seen}


def probe_nodes(locations: dict[str, str], timeout_s: float = 120.0) -> list[Finding]:
    """Every node that is up, probed by a 0-CPU task pinned to it: its versions against the
    driver's, and each location read (the driver's marker) and written with the node's credentials."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    findings: list[Finding] = []
    nonce = uuid.uuid4().hex[:12]
    written = {}
    for key, location in locations.items():
        if not location:
            continue
        location = absolute(location)  # probes run in their own cwd
        try:
            write_text(_marker(location, nonce, "driver"), nonce)
            written[key] = location
        except (OSError, StorageError) as e:
            findings.append(Finding(f"{key} writable from the driver", False, f"{location}: {e}"))
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    probe = ray.remote(num_cpus=0)(probe_node)
    refs = [
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            written, nonce
        )
        for n in nodes
    ]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    reports = [ray.get(r) for r in ready]
    mine = versions()
    findings.append(
        Finding(
            "nodes answered",
            len(reports) == len(nodes),
            f"{len(reports)} of {len(nodes)} nodes up within {timeout_s:.0f} s "
            "(nodes the autoscaler adds later are not probed)",
        )
    )
    for report in reports:
        node = report["node"][:12]
        differs = {k: v for k, v in report["versions"].items() if v != mine[k]}
        findings.append(
            Finding(
                f"node {node} versions",
                not differs,
                "same as the driver: " + json.dumps(mine)
                if not differs
                else f"differs from the driver {json.dumps(mine)}: {json.dumps(differs)}",
            )
        )
        for key, seen in report["locations"].items():
            findings.append(Finding(f"node {node} reads and writes {key}", seen == "ok", f"{written[key]}: {seen}"))
    for location in written.values():  # best effort: object stores and disks keep nothing of the check
        _cleanup(location, nonce)
    return findings


def check_nodes(cfg: Any) -> None:
    """Before a job's workers are requested, on a cluster of several nodes: probe_nodes, and
    ClusterCheckFailed naming what failed (a node with another image, a location a node cannot use)."""
    if several_nodes() is None:
        return
    failed = [f for f in probe_nodes(worker_locations(cfg)) if not f.ok]
    if failed:
        raise ClusterCheckFailed(
            "; ".join(f"{f.check}: {f.detail}" for f in failed) + " (`bigray cluster check` lists every check)"
        )


def check(cfg: Any | None) -> list[Finding]:
    """`bigray cluster check`: every check against the connected cluster, for the job ``cfg`` (None:
    the nodes' versions only)."""
    findings: list[Finding] = []
    locations = worker_locations(cfg) if cfg is not None else {}
    try:
        check_shared_locations(locations)
        findings.append(
            Finding("locations shared", True, ", ".join(f"{k}={v}" for k, v in locations.items()) or "no job given")
        )
    except ConfigError as e:
        findings.append(Finding("locations shared", False, str(e)))
    findings += probe_nodes(locations, timeout_s=300.0)
    trainer = cfg.trainer_config() if isinstance(cfg, TuneJobConfig) else cfg
    if trainer is not None:
        scaling = trainer.scaling
        if scaling.accelerator_type:
            offered = offered_accelerators()
            findings.append(
                Finding(
                    "accelerator type offered",
                    scaling.accelerator_type in offered,
                    f"the job asks for {scaling.accelerator_type}; nodes and node types offer {sorted(offered) or 'none'}",
                )
            )
        bundle = worker_bundle(scaling)
        most = workers_fitting_at_most(bundle)
        now = workers_fitting_now(bundle)
        enough = max(now, most or 0) >= scaling.min_workers
        findings.append(
            Finding(
                "workers fit",
                enough,
                f"{scaling.num_workers} workers of {bundle}: {now} fit now, "
                f"{'no autoscaler' if most is None else f'{most} at most'}",
            )
        )
    return findings


def _cleanup(location: str, nonce: str) -> None:
    """Remove this check's markers, and the markers' folder when no other check is using it."""
    import pyarrow.fs as pafs

    try:
        fs, path = filesystem(join(location, MARKER_DIR, nonce))
        fs.delete_dir(path)
        folder = path.rsplit("/", 1)[0]
        if fs.get_file_info(folder).type == pafs.FileType.Directory and not fs.get_file_info(pafs.FileSelector(folder)):
            fs.delete_dir(folder)
    except Exception as e:  # noqa: BLE001 - leftovers are harmless; say so and go on
        log.warning("could not remove the check's markers under %s: %s", location, e)
