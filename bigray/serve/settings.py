"""The Serve app's settings, one typed model: what serve/config.yaml's ``args`` hold
(:class:`AppArgs`), and what ``bigray serve`` / ``jobs/serve_app.py`` add (:class:`ServeArgs`).

Every number a deployment runs with comes from here: replicas, ``max_ongoing_requests``, the
``@serve.batch`` size and wait, CPUs/GPUs and the weights' dtype. Unknown keys are errors.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bigray.config import Location


class DeploymentArgs(BaseModel):
    """One model deployment: autoscaling, batching and resources of its replicas."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: float = Field(default=8, gt=0)
    max_ongoing_requests: int = Field(default=32, ge=1)
    max_queued_requests: int = Field(default=64, ge=-1)
    """Requests waiting for a replica (per caller) beyond which new ones are answered 429 with
    Retry-After instead of waiting without bound; -1: no limit. Queued requests still count as
    load for Serve's autoscaler."""
    retry_after_s: float = Field(default=1.0, gt=0)
    """The Retry-After a refused request is told."""
    max_batch_size: int = Field(default=16, ge=1)
    """GPT: most prompts decoding together (continuous batching); ResNet: largest @serve.batch."""
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)
    """ResNet: how long a batch waits to fill (GPT never waits: arrivals join at the next step)."""
    num_cpus: float = Field(default=1, gt=0)
    num_gpus: float = Field(default=0, ge=0)
    """> 0: the model runs on the replica's GPU."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Weights cast at load: bfloat16 is much faster on CPUs with AMX / AVX-512 BF16 (runners.torch_dtype)."""
    accelerator_type: str | None = None
    """Ray's name of the GPU a replica needs (A10G, H100, ...): replicas land on that node type only."""

    def options(self) -> dict[str, Any]:
        """The ``Deployment.options(...)`` these settings mean."""
        return {
            # max_ongoing_requests >= max_batch_size, or @serve.batch never fills
            "max_ongoing_requests": max(self.max_ongoing_requests, self.max_batch_size),
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "initial_replicas": max(1, self.min_replicas),
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            },
            "ray_actor_options": {
                "num_cpus": self.num_cpus,
                "num_gpus": self.num_gpus,
                **({"accelerator_type": self.accelerator_type} if self.accelerator_type else {}),
            },
            "max_queued_requests": self.max_queued_requests,
            # what a refused request is told: 429 Too Many Requests with Retry-After
            "backpressure_config": {"status_code": 429, "retry_after_s": self.retry_after_s},
        }


class AppArgs(BaseModel):
    """Arguments of the Serve app (serve/config.yaml's ``args``, or from ServeArgs); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    gpt_checkpoint: Location | None = None
    """GPT checkpoint, run directory, summary.json or exported HF directory (path or URI); None: not served."""
    resnet_checkpoint: Location | None = None
    """ResNet checkpoint, run directory or summary.json (path or URI); None: not served."""
    gpt_name: str = "bigray-gpt"
    resnet_name: str = "bigray-resnet"
    max_prompt_tokens: int = Field(default=512, ge=1)
    max_tokens_limit: int = Field(default=256, ge=1)
    max_prompts: int = Field(default=16, ge=1)
    """Most prompts in one completion request (each becomes its own generation job)."""
    max_prompt_chars: int = Field(default=32_768, ge=1)
    """Longest prompt in characters, checked before tokenizing (max_prompt_tokens is checked after)."""
    max_body_bytes: int = Field(default=1_000_000, ge=1)
    """Largest JSON body, counted as it is read (a chunked upload cannot pass it)."""
    max_image_bytes: int = Field(default=4_000_000, ge=1)
    max_image_pixels: int = Field(default=16_000_000, ge=1)
    gpt: DeploymentArgs = DeploymentArgs(max_batch_size=8)
    resnet: DeploymentArgs = DeploymentArgs()
    api_key_env: str = "BIGRAY_API_KEY"
    """Environment variable holding the API key, read in the ingress replica (unset: no key needed)."""
    api_key_file: str | None = None
    """A file holding the API key (e.g. a mounted Kubernetes Secret), read in the ingress replica;
    surrounding whitespace is stripped. Takes precedence over ``api_key_env``."""
    ingress_num_cpus: float = Field(default=0, ge=0)
    """CPUs the ingress replica reserves. On a cluster whose head advertises no CPUs (cluster.yaml, the
    RayService: the head holds the autoscaler's cloud rights) a sliver (0.01) keeps the ingress, which
    parses client bodies, off the head; 0 lets it share a small machine's CPUs with the models."""
    admin_key_env: str = "BIGRAY_ADMIN_KEY"
    """Environment variable holding the admin key, read in the ingress replica: only a request with it
    sees where the models come from in /v1/status (checkpoints, a refused swap's error text)."""
    admin_key_file: str | None = None
    """A file holding the admin key (takes precedence over ``admin_key_env``)."""
    allow_unauthenticated: bool = False
    """Serve without an API key. Without a key the ingress refuses to start unless this is set,
    whatever started it (``bigray serve`` sets it for a loopback host; a config file that listens
    beyond this machine must not, unless the network is one you trust)."""


def has_key(args: AppArgs) -> bool:
    """Whether an API key is configured (its file, or its variable in this process's environment)."""
    return bool(args.api_key_file or os.environ.get(args.api_key_env, "").strip())


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` laid on it, section by section (``--set gpt.num_gpus=0`` keeps gpt's other keys)."""
    for key, value in over.items():
        base[key] = (
            _merged(dict(base[key]), value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        )
    return base


SERVE_CONFIG_KEYS = ("proxy_location", "http_options", "grpc_options", "logging_config", "target_capacity")
"""Top-level keys of a Ray Serve config file besides ``applications``."""


LOOPBACK = ("127.0.0.1", "localhost", "::1")
"""Hosts only this machine can reach."""


class ServeArgs(AppArgs):
    """`bigray serve` and jobs/serve_app.py: the app's args, where Serve's HTTP proxy listens, and two
    shortcuts that set both deployments at once (``--set dtype=bfloat16``, ``--set num_gpus=1``).

    ``--config`` takes these keys, or a Ray Serve config file (what ``serve deploy`` takes, e.g.
    serve/cluster-config.yaml): its bigray app's args, with host and port from ``http_options``."""

    @model_validator(mode="before")
    @classmethod
    def _from_serve_config(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "applications" not in data:
            return data
        data = dict(data)
        apps = [
            a
            for a in data.pop("applications") or []
            if isinstance(a, dict) and a.get("import_path") == "bigray.serve.app:build_app"
        ]
        if len(apps) != 1:
            raise ValueError(
                f"a Serve config must hold one bigray app (import_path bigray.serve.app:build_app), found {len(apps)}"
            )
        http = data.get("http_options") or {}
        for key in SERVE_CONFIG_KEYS:
            data.pop(key, None)
        return _merged(
            _merged(dict(apps[0].get("args") or {}), {k: http[k] for k in ("host", "port") if k in http}), data
        )

    host: str = "127.0.0.1"
    """HTTP host (0.0.0.0 to listen on every interface, as a cluster's head needs: then an API key
    is required, unless ``allow_unauthenticated``)."""
    port: int = Field(default=8000, ge=1, le=65535)
    access_log: bool = True
    """Log every request (Serve's access log); off saves about 10% CPU per request on a small box."""
    dtype: Literal["float32", "bfloat16"] | None = None
    """Both models' weights dtype (None: each deployment's own)."""
    num_gpus: float | None = Field(default=None, ge=0)
    """GPUs per replica of both models (None: each deployment's own)."""

    def app_args(self) -> AppArgs:
        """The app's own args, with the shortcuts applied to both deployments."""
        shortcuts = {k: v for k, v in (("dtype", self.dtype), ("num_gpus", self.num_gpus)) if v is not None}
        fields = self.model_dump(include=set(AppArgs.model_fields))
        for model in ("gpt", "resnet"):
            fields[model].update(shortcuts)
        return AppArgs(**fields)

    def key_missing_for_host(self) -> str | None:
        """Why this server would be open to the network without a key (None: it is not)."""
        if self.host in LOOPBACK or self.allow_unauthenticated or has_key(self):
            return None
        return (
            f"serving on {self.host} (beyond this machine) needs an API key: set {self.api_key_env} or api_key_file, "
            "or --set allow_unauthenticated=true on a network you trust"
        )
