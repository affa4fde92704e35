"""Run the Serve app from Python: a quick local server (`bigray serve`) or a deployment on a cluster."""

from __future__ import annotations

import logging
import time

from bigray.cluster import ensure_ray, offered_accelerators
from bigray.config import ConfigError
from bigray.serve.app import build_app
from bigray.serve.settings import LOOPBACK, AppArgs, ServeArgs, has_key

log = logging.getLogger(__name__)


def deploy(
    args: AppArgs, host: str = "127.0.0.1", port: int = 8000, name: str = "bigray", access_log: bool = True
) -> str:
    """Start Serve's HTTP proxy on host:port and deploy the app; returns the base URL.

    ``access_log=False`` turns off Serve's per-request log lines in the proxy and the replicas.
    """
    from ray import serve

    ensure_ray()
    wanted = {
        model: d.accelerator_type
        for model, d, checkpoint in (
            ("gpt", args.gpt, args.gpt_checkpoint),
            ("resnet", args.resnet, args.resnet_checkpoint),
        )
        if checkpoint and d.accelerator_type
    }
    offered = offered_accelerators() if wanted else set()
    for model, accelerator in wanted.items():
        if accelerator not in offered:  # its replicas would wait for a node forever
            raise ConfigError(
                f"{model}.accelerator_type",
                f"{accelerator} is offered by no node or node type of this cluster "
                f"(they offer {sorted(offered) or 'none'})",
            )
    if host in LOOPBACK and not has_key(args):  # only this machine can reach it
        args = args.model_copy(update={"allow_unauthenticated": True})
    logging_config = {"enable_access_log": access_log}
    serve.start(http_options={"host": host, "port": port}, logging_config=logging_config)
    serve.run(build_app(args), name=name, route_prefix="/", logging_config=logging_config)
    url = f"http://{host}:{port}"
    log.info(
        "serving %s at %s (GET /healthz, /v1/status, /v1/models; POST /v1/completions, /v1/chat/completions, /v1/classify)",
        name,
        url,
    )
    return url


def deploy_from(args: ServeArgs, name: str = "bigray") -> str:
    """Deploy what `bigray serve` / jobs/serve_app.py were given; returns the base URL."""
    return deploy(args.app_args(), args.host, args.port, name=name, access_log=args.access_log)


def serve_forever(args: ServeArgs, name: str = "bigray") -> None:
    """`bigray serve`: deploy, print the URL, and run until Ctrl-C.

    On the way out it deletes its own app; it shuts Serve down only when no other app is left, so
    attached to a shared cluster (RAY_ADDRESS) it leaves other people's apps serving.
    """
    import ray
    from ray import serve

    try:
        url = deploy_from(args, name)
        print(f"bigray is serving at {url} (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if ray.is_initialized():
            try:
                serve.delete(name)
                if not serve.status().applications:
                    serve.shutdown()
            except Exception as e:  # Serve already gone: nothing of ours is left to clean up
                log.warning("cleaning up Serve failed: %s", e)
            ray.shutdown()
