"""Connecting to Ray and checking what the cluster can run: used by training, Tune, Serve and the quickstart."""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Callable, Mapping, MutableMapping

from bigray.config import ConfigError, ScalingConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class WorkersUnavailable(RuntimeError):
    """The cluster did not come to hold the job's workers within ``scaling.resource_wait_s``: a
    matter of capacity at run time, not of the config."""


SECRET_VARIABLES = tuple(
    "BIGRAY_API_KEY MLFLOW_TRACKING_TOKEN MLFLOW_TRACKING_PASSWORD WANDB_API_KEY HF_TOKEN AWS_SECRET_ACCESS_KEY "
    "AWS_SESSION_TOKEN BIGRAY_ADMIN_KEY BIGRAY_TUNE_STATE_KEY".split()
)
"""Environment variables that hold secrets, which never belong in a job's ``runtime_env``: Ray shows
it in the dashboard and ``ray job list``."""


def read_secret_files(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Set each secret variable that is unset from the file ``<NAME>_FILE`` names (a mounted
    Kubernetes Secret, a file on every node), in this process; returns the names set. The driver and
    every worker call it, each reading its own node's file."""
    environ = os.environ if environ is None else environ
    found = []
    for name in SECRET_VARIABLES:
        path = environ.get(f"{name}_FILE")
        if path and not environ.get(name):
            try:
                value = open(path).read().strip()
            except OSError as e:
                raise ConfigError(f"{name}_FILE", f"cannot read {path}: {e.strerror}") from None
            environ[name] = value
            found.append(name)
    return found


def warn_secrets_in_runtime_env() -> list[str]:
    """Warn, naming them, about secret variables passed in this job's ``runtime_env``."""
    import ray

    env_vars = (ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}
    names = sorted(set(env_vars) & set(SECRET_VARIABLES))
    if names:
        log.warning(
            "%s in the job's runtime_env: Ray shows runtime_env in the dashboard and `ray job list`. Give secrets "
            "through a file (<NAME>_FILE, e.g. a mounted Kubernetes Secret), the nodes' environment or a role",
            ", ".join(names),
        )
    return names


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
        warn_secrets_in_runtime_env()
    else:
        # The dashboard is needed: Train V2 / Tune clean up through the State API.
        ray.init(include_dashboard=True)
    return True


def worker_bundle(scaling: ScalingConfig) -> dict[str, float]:
    """The resources one training worker asks Ray for (what Ray Train's ScalingConfig will request)."""
    bundle = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        bundle["GPU"] = 1.0
    if scaling.accelerator_type:
        bundle[f"accelerator_type:{scaling.accelerator_type}"] = 0.001  # as Ray Train requests it
    return bundle


def _fits(resources: Mapping[str, float], bundle: Mapping[str, float]) -> int:
    """How many copies of ``bundle`` one node with ``resources`` holds."""
    return int(min(resources.get(k, 0.0) / v for k, v in bundle.items()) + 1e-9)


def workers_fitting_now(bundle: Mapping[str, float]) -> int:
    """Workers of this shape the cluster's live nodes hold (busy or not)."""
    import ray

    return sum(_fits(n["Resources"], bundle) for n in ray.nodes() if n.get("Alive"))


def workers_fitting_at_most(bundle: Mapping[str, float]) -> int | None:
    """Workers of this shape the cluster can scale to, from the node types its autoscaler publishes
    to the GCS (what Ray Data reads too); None when no autoscaler published any (a fixed cluster)."""
    import ray._private.state

    config = ray._private.state.state.get_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    total = 0
    for group in config.node_group_configs:
        fits = _fits(dict(group.resources), bundle)
        if fits and group.max_count == -1:
            return sys.maxsize
        total += fits * max(group.max_count, 0)
    return total


def offered_accelerators() -> set[str]:
    """Ray's accelerator types (H100, A10G, ...) of the nodes that are up and of the node types the
    autoscaler published: what a job's or a replica's ``accelerator_type`` can get."""
    import ray
    import ray._private.state

    names = {k for n in ray.nodes() if n.get("Alive") for k in n["Resources"]}
    config = ray._private.state.state.get_cluster_config()
    if config is not None:
        names |= {k for group in config.node_group_configs for k in group.resources}
    return {k.split(":", 1)[1] for k in names if k.startswith("accelerator_type:")}


SHARED_FILESYSTEM_ENV = "BIGRAY_SHARED_FILESYSTEM"
"""Set to 1 when every node mounts the same filesystem at the same paths (local paths are then shared)."""


def several_nodes() -> str | None:
    """Why this cluster's processes may run on more than one node ("3 nodes are up", "its autoscaler
    can add nodes"), or None for a single node that nothing will add to."""
    import ray
    import ray._private.state

    alive = sum(1 for n in ray.nodes() if n.get("Alive"))
    if alive > 1:
        return f"{alive} nodes are up"
    config = ray._private.state.state.get_cluster_config()
    # -1: no limit
    if config is not None and sum(g.max_count if g.max_count >= 0 else 2 for g in config.node_group_configs) > 1:
        return "its autoscaler can add nodes"
    if os.environ.get("BIGRAY_WAIT_FOR_AUTOSCALER"):
        return "BIGRAY_WAIT_FOR_AUTOSCALER says nodes will be added"
    return None


def _shape(bundle: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle.items()) + "}"


def wait_for_workers(scaling: ScalingConfig, poll_s: float = 2.0, report_every_s: float = 15.0) -> None:
    """Return once the cluster holds ``scaling.num_workers`` workers (an elastic run's minimum; the
    autoscaler is asked for its maximum), waiting for an autoscaler to add
    nodes (up to ``scaling.resource_wait_s``, with a progress line); fail at once when nothing can
    ever hold them: the autoscaler's node types are too small, or there is no autoscaler at all
    (unless BIGRAY_WAIT_FOR_AUTOSCALER=1 says nodes will be added by other means)."""
    from ray.autoscaler.sdk import request_resources

    bundle, need = worker_bundle(scaling), scaling.min_workers
    have = workers_fitting_now(bundle)
    if have >= need:
        return
    what = f"{need} workers of {_shape(bundle)}"
    most = workers_fitting_at_most(bundle)
    if most is not None and most < need:
        raise ConfigError(
            "scaling",
            f"the cluster can never hold {what}: its node types scale to at most {most} "
            "(lower scaling.num_workers or the per-worker resources, or add a node type)",
        )
    if most is None and not os.environ.get("BIGRAY_WAIT_FOR_AUTOSCALER"):
        raise ConfigError(
            "scaling",
            f"the cluster holds {have} of {what} and has no autoscaler to add nodes "
            "(lower scaling.num_workers, set scaling.use_gpu=false to train on CPUs, or set "
            "BIGRAY_WAIT_FOR_AUTOSCALER=1 if nodes will be added)",
        )
    if scaling.resource_wait_s <= 0:
        raise ConfigError("scaling.resource_wait_s", f"is 0 and the cluster holds {have} of {what} now")
    # asks the autoscaler for the nodes now: all the run can use, though it starts once its minimum fits
    request_resources(bundles=[dict(bundle) for _ in range(scaling.max_workers)])
    start = last_report = time.monotonic()
    log.info("waiting up to %.0f s for the cluster to hold %s (%d fit now)", scaling.resource_wait_s, what, have)
    try:
        while True:
            time.sleep(poll_s)
            have = workers_fitting_now(bundle)
            waited = time.monotonic() - start
            if have >= need:
                log.info("the cluster holds %s after %.0f s", what, waited)
                return
            if waited >= scaling.resource_wait_s:
                raise WorkersUnavailable(
                    f"waited {waited:.0f} s and the cluster holds {have} of {what}; "
                    "raise scaling.resource_wait_s or check the autoscaler (`ray status`)"
                )
            if time.monotonic() - last_report >= report_every_s:
                last_report = time.monotonic()
                log.info(
                    "still waiting for %s: %d fit now (%.0f of %.0f s)", what, have, waited, scaling.resource_wait_s
                )
    finally:
        request_resources(bundles=[])  # Ray Train's own placement group holds the nodes from here


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


def training_precision(requested: str, device: "torch.device", fp16: bool = True, cpu_bf16: bool = False) -> str:
    """The precision a worker trains in: 'auto' is bf16 on a GPU with bf16 tensor cores (compute
    capability 8.0+), else fp16 on a GPU (fp32 when the loop has no ``fp16`` path); on a CPU fp32, or
    bf16 where the loop has a CPU bf16 path (``cpu_bf16``) and the CPU has bf16 instructions."""
    import torch

    if requested == "bf16" and device.type != "cuda" and not cpu_has_bf16():
        log.warning(
            "precision bf16 on a CPU without bf16 instructions (AVX512-BF16, AMX): emulated, about 10x slower "
            "than fp32 here; 'auto' picks fp32 on such a CPU"
        )
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "bf16" if cpu_bf16 and cpu_has_bf16() else "fp32"
    if torch.cuda.get_device_capability(device)[0] >= 8:
        return "bf16"
    return "fp16" if fp16 else "fp32"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX; oneDNN's own test):
    there bf16 matmuls run about 2x fp32's rate, elsewhere they are emulated and slower."""
    import torch

    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def enable_tf32(device: "torch.device") -> None:
    """fp32 matmuls and convolutions on a GPU run on TF32 tensor cores (what fp32 MFU is measured against)."""
    import torch

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# ------------------------------------------------------------------ preemption notices

AWS_METADATA_ENDPOINT = "http://169.254.169.254"


def aws_spot_notice(timeout_s: float = 2.0) -> float | None:
    """When EC2 will interrupt this spot instance (epoch seconds), or None while no interruption is
    scheduled: the instance metadata's ``spot/instance-action``, read with an IMDSv2 session token.
    AWS_EC2_METADATA_SERVICE_ENDPOINT moves the endpoint, as for botocore. Raises OSError where there
    is no metadata endpoint (not on EC2)."""
    base = os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", AWS_METADATA_ENDPOINT).rstrip("/")
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the endpoint is link-local: no proxy
    ask = urllib.request.Request(
        f"{base}/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"}
    )
    with direct.open(ask, timeout=timeout_s) as reply:
        token = reply.read().decode()
    ask = urllib.request.Request(
        f"{base}/latest/meta-data/spot/instance-action", headers={"X-aws-ec2-metadata-token": token}
    )
    try:
        with direct.open(ask, timeout=timeout_s) as reply:
            action = json.loads(reply.read())
    except urllib.error.HTTPError as e:
        if e.code == 404:  # no interruption scheduled
            return None
        raise
    return datetime.datetime.fromisoformat(action["time"]).timestamp()


NOTICE_SOURCES: dict[str, Callable[[], float | None]] = {"aws": aws_spot_notice}
"""run.preemption_notice's sources besides Ray's own drains: each returns when its node goes (epoch
seconds) or None; a cloud's metadata endpoint is one function here."""


def drain_this_node(deadline: float, reason: str) -> bool:
    """Tell Ray this node goes at ``deadline`` (epoch seconds), as Ray's autoscaler does for a node it
    preempts: Ray places nothing new here, and Ray Train's preemption watcher tells the run on it.
    It is the call ``ray drain-node`` makes (Ray has no public Python API for it)."""
    import ray
    from ray.core.generated import autoscaler_pb2

    context = ray.get_runtime_context()
    gcs = ray._raylet.GcsClient(address=context.gcs_address)
    accepted, refusal = gcs.drain_node(
        context.get_node_id(),
        autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
        reason,
        int(deadline * 1000),
    )
    if not accepted:
        log.warning("Ray refused to drain this node (%s): %s", reason, refusal)
    return accepted


def watch_for_notices(source: str, poll_s: float = 5.0) -> threading.Thread | None:
    """Poll one of :data:`NOTICE_SOURCES` in a daemon thread and drain this node at its first notice.
    "ray" needs no watcher: Ray Train watches Ray's drains itself."""
    if source == "ray":
        return None
    notice = NOTICE_SOURCES[source]

    def watch() -> None:
        first = True
        while True:
            try:
                deadline = notice()
            except OSError as e:
                if first:  # no such endpoint here: this node is not where the source applies
                    log.warning("no %s preemption notices on this node (%s): not watching for them", source, e)
                    return
                deadline = None  # a transient failure: ask again at the next poll
            except (ValueError, KeyError) as e:  # a notice we cannot read: ask again at the next poll
                log.warning("unreadable %s preemption notice: %s", source, e)
                deadline = None
            first = False
            if deadline is not None:
                log.warning(
                    "%s interruption notice: this node goes in %.0f s; draining it", source, deadline - time.time()
                )
                drain_this_node(deadline, f"{source} interruption notice")
                return
            time.sleep(poll_s)

    thread = threading.Thread(target=watch, name=f"bigray-{source}-notices", daemon=True)
    thread.start()
    return thread
