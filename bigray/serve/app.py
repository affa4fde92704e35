"""``build_app(args) -> Application``: what ``serve run serve/config.yaml`` imports (typed args,
vLLM/Ray-style app builder). Settings in settings.py, schemas in protocol.py, model logic in
runners.py, replicas in deployments.py, HTTP routes in ingress.py."""

from __future__ import annotations

import os
from typing import Any

from ray import serve

from bigray.artifacts.storage import absolute
from bigray.serve.deployments import GPTDeployment, ResNetDeployment
from bigray.serve.ingress import Ingress
from bigray.serve.settings import AppArgs


def build_app(args: dict[str, Any] | AppArgs) -> serve.Application:
    """The Serve application for ``args`` (either model may be left out, not both)."""
    if not isinstance(args, AppArgs):
        args = AppArgs(**args)
    if not args.gpt_checkpoint and not args.resnet_checkpoint:
        raise ValueError("give gpt_checkpoint, resnet_checkpoint or both")
    # Pin relative paths here: replicas run in their own working directory.
    args = args.model_copy(
        update={
            name: absolute(getattr(args, name))
            for name in ("gpt_checkpoint", "resnet_checkpoint")
            if getattr(args, name)
        }
    )
    gpt = resnet = None
    if args.gpt_checkpoint:
        g = args.gpt
        gpt = GPTDeployment.options(**g.options(), user_config={"checkpoint": args.gpt_checkpoint}).bind(
            args.max_prompt_tokens, g.model_dump()
        )
    if args.resnet_checkpoint:
        r = args.resnet
        resnet = ResNetDeployment.options(**r.options(), user_config={"checkpoint": args.resnet_checkpoint}).bind(
            args.max_image_pixels, r.model_dump()
        )
    # The ingress gets no checkpoint paths: a model swap then leaves it untouched.
    ingress_args = args.model_dump(exclude={"gpt_checkpoint", "resnet_checkpoint"})
    # The key itself is read by the ingress replica (where it is enforced), never passed in the
    # app's config; a key set here but unseen there makes the replica refuse to start.
    key_expected = bool(os.environ.get(args.api_key_env, "").strip())
    return Ingress.options(ray_actor_options={"num_cpus": args.ingress_num_cpus}).bind(
        gpt, resnet, ingress_args, key_expected
    )
