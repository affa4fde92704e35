"""Ray Serve app: a FastAPI ingress in front of a GPT and a ResNet deployment, each scaled on its own.

``build_app(args) -> Application`` is what ``serve run serve/config.yaml`` imports (typed args,
vLLM/Ray-style app builder). Routes live in the ingress; schemas in protocol.py; model logic in
runners.py. Client mistakes become OpenAI-style JSON errors with a 4xx status, never a 500.
"""


import asyncio
import collections
import contextlib
import hmac
import json
import logging
import os
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from bigray.serve.protocol import (
    ClassificationResponse,
    ClassLabel,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorDetail,
    ErrorResponse,
    GenerationParams,
    ModelCard,
    ModelList,
    ServeError,
    Usage,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- typed app args


class DeploymentArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: float = Field(default=8, gt=0)
    max_ongoing_requests: int = Field(default=32, ge=1)
    max_batch_size: int = Field(default=16, ge=1)
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)
    num_cpus: float = Field(default=1, gt=0)
    num_gpus: float = Field(default=0, ge=0)  # > 0: the model runs on the replica's GPU
    # weights cast to bfloat16 at load: much faster on CPUs with AMX / AVX-512 BF16 (runners.torch_dtype)
    dtype: Literal["float32", "bfloat16"] = "float32"

    def options(self) -> dict[str, Any]:
        return {
            # max_ongoing_requests >= max_batch_size, or @serve.batch never fills
            "max_ongoing_requests": max(self.max_ongoing_requests, self.max_batch_size),
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "initial_replicas": max(1, self.min_replicas),
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            },
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }


class AppArgs(BaseModel):
    """Arguments of the Serve app (from serve/config.yaml or `bigray serve`); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    gpt_checkpoint: str | None = None
    resnet_checkpoint: str | None = None
    gpt_name: str = "bigray-gpt"
    resnet_name: str = "bigray-resnet"
    max_prompt_tokens: int = Field(default=512, ge=1)
    max_tokens_limit: int = Field(default=256, ge=1)
    max_image_bytes: int = Field(default=4_000_000, ge=1)
    max_image_pixels: int = Field(default=16_000_000, ge=1)
    gpt: DeploymentArgs = DeploymentArgs(max_batch_size=8)
    resnet: DeploymentArgs = DeploymentArgs()
    api_key_env: str = "BIGRAY_API_KEY"


def _threads(num_cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))


def error_fields(e: ServeError) -> dict[str, Any]:
    return {"status": e.status, "message": e.message, "type": e.type}


def raise_if_error(result: dict[str, Any]) -> dict[str, Any]:
    if "error" in result:
        err = result["error"]
        raise ServeError(err["status"], err["message"], err["type"])
    return result


# ----------------------------------------------------------------------------- model deployments


class SwappableModel:
    """A model replica whose checkpoint arrives as user_config ``{"checkpoint": path}``.

    Pointing a running app at a new checkpoint is then an in-place reconfigure: the old model
    answers until the new one has loaded, then they swap. Subclasses say how to load a runner.

    Requests enter the ``@serve.batch`` queue only while the model is idle. Serve's batch loop
    (Ray 2.60, since ``max_concurrent_batches`` exists) forms the next batch while the previous one
    still runs, from whatever arrived within ``batch_wait_timeout_s``; under load that queued
    batches of 1-2 behind the model (bench/README.md). Held back here, everything that arrived
    during a forward pass goes into the next batch together: batches grow with the backlog, and a
    request reaching an idle replica goes straight into the batch queue.
    """

    def __init__(self, settings: dict[str, Any]):
        self.settings = DeploymentArgs(**settings)
        _threads(self.settings.num_cpus)
        self.runner: Any = None
        self.checkpoint: str | None = None
        self._batched.set_max_batch_size(self.settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        self._model_idle = asyncio.Event()
        self._model_idle.set()
        self.batch_sizes: collections.Counter[int] = collections.Counter()

    @contextlib.contextmanager
    def _model_busy(self, batch_size: int) -> Iterator[None]:
        """Wrap a batch's model work: requests arriving meanwhile wait for the next batch."""
        self.batch_sizes[batch_size] += 1
        self._model_idle.clear()
        try:
            yield
        finally:
            self._model_idle.set()

    def batch_stats(self) -> dict[str, Any]:
        """How well batching works here (shown by /healthz): batches run, requests in them, the largest."""
        batches, requests = sum(self.batch_sizes.values()), sum(k * n for k, n in self.batch_sizes.items())
        return {"batches": batches, "requests": requests, "largest": max(self.batch_sizes, default=0)}

    def load(self, path: str) -> Any:
        raise NotImplementedError

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        path = user_config["checkpoint"]
        if path != self.checkpoint:
            self.runner = self.load(path)
            self.checkpoint = path


@serve.deployment(name="gpt")
class GPTDeployment(SwappableModel):
    """Text generation; concurrent prompts are decoded together (shared forward passes + KV cache)."""

    def __init__(self, max_prompt_tokens: int, settings: dict[str, Any]):
        self.max_prompt_tokens = max_prompt_tokens
        super().__init__(settings)

    def load(self, path: str) -> Any:
        from bigray.serve.runners import GPTRunner, gpt_model_dir

        return GPTRunner(gpt_model_dir(path), self.max_prompt_tokens, self.settings.dtype, self.settings.num_gpus > 0)

    def ready(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "context": self.runner.max_positions, **self.batch_stats()}

    def check(self, job: dict[str, Any]) -> dict[str, Any]:
        """Prompt token count, or the client error (returned, not raised: it crosses a handle)."""
        try:
            return {"prompt_tokens": self.runner.check(GenerationParams(**job))}
        except ServeError as e:
            return {"error": error_fields(e)}

    async def generate(self, job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        await self._model_idle.wait()
        async for delta in self._batched(GenerationParams(**job)):
            yield {"text": delta.text, "finish_reason": delta.finish_reason, "completion_tokens": delta.completion_tokens}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, jobs: list[GenerationParams]) -> AsyncIterator[list[Any]]:
        runner = self.runner
        steps = runner.generate(jobs)
        with self._model_busy(len(jobs)):
            while True:
                # each decode step runs off the event loop, so the replica keeps accepting requests
                step = await asyncio.to_thread(next, steps, None)
                if step is None:
                    return
                yield [StopIteration if d is None else d for d in step]


@serve.deployment(name="resnet")
class ResNetDeployment(SwappableModel):
    """Image classification with dynamic batching (@serve.batch)."""

    def __init__(self, max_image_pixels: int, settings: dict[str, Any]):
        self.max_image_pixels = max_image_pixels
        super().__init__(settings)

    def load(self, path: str) -> Any:
        from bigray.serve.runners import ClassifierRunner

        return ClassifierRunner(path, self.max_image_pixels, self.settings.dtype, self.settings.num_gpus > 0)

    def ready(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, **self.runner.describe(), **self.batch_stats()}

    async def classify(self, image: bytes, top_k: int) -> dict[str, Any]:
        """Top-k labels, or the client error (returned, not raised: it crosses a handle)."""
        try:
            x = self.runner.preprocess(image)
        except ServeError as e:
            return {"error": error_fields(e)}
        await self._model_idle.wait()
        probs = await self._batched(x)
        k = min(top_k, len(probs))
        scores, idx = probs.topk(k)
        names = self.runner.class_names
        return {"predictions": [{"label": names[i], "index": int(i), "score": float(s)} for s, i in zip(scores.tolist(), idx.tolist())]}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _batched(self, images: list[Any]) -> list[Any]:
        import torch

        with self._model_busy(len(images)):
            probs = await asyncio.to_thread(self.runner.classify, torch.stack(images))
        return list(probs)


# ----------------------------------------------------------------------------- HTTP ingress

api = FastAPI(title="bigray", description="GPT completions and ResNet classification on Ray Serve")


def error_response(status: int, message: str, type_: str) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(message=message, type=type_, code=status))
    return JSONResponse(status_code=status, content=body.model_dump())


@api.exception_handler(ServeError)
async def _serve_error(_: Request, exc: ServeError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.type)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(400, _describe(exc.errors()), "invalid_request_error")


def _describe(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


async def _json_body(request: Request) -> Any:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("application/json", ""):
        raise ServeError(415, f"unsupported content type {ctype}; send application/json", "unsupported_media_type")
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError:
        raise ServeError(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ServeError(400, "the body must be a JSON object")
    return body


@serve.deployment(name="ingress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    def __init__(self, gpt: DeploymentHandle | None, resnet: DeploymentHandle | None, args: dict[str, Any], api_key: str | None):
        self.gpt, self.resnet = gpt, resnet
        self.args = AppArgs(**args)
        self.api_key = api_key or None

    def _authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise ServeError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error")

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """Liveness, and readiness once every model replica has loaded its checkpoint."""
        models = {}
        try:
            for name, handle in (("gpt", self.gpt), ("resnet", self.resnet)):
                if handle is not None:
                    models[name] = await asyncio.wait_for(handle.ready.remote(), timeout=5)
        except Exception as e:  # not loaded yet, or a replica is restarting
            return JSONResponse(status_code=503, content={"status": "loading", "detail": str(e)[:200]})
        return JSONResponse(content={"status": "ok", "models": models})

    @api.get("/v1/models")
    async def models(self, request: Request) -> ModelList:
        self._authorize(request)
        cards = []
        if self.gpt is not None:
            cards.append(ModelCard(id=self.args.gpt_name, task="text-completion"))
        if self.resnet is not None:
            cards.append(ModelCard(id=self.args.resnet_name, task="image-classification"))
        return ModelList(data=cards)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        self._authorize(request)
        if self.gpt is None:
            raise ServeError(404, "no GPT model is served here", "not_found_error")
        body = await _json_body(request)
        try:
            req = CompletionRequest.model_validate(body)
        except ValidationError as e:
            raise ServeError(400, _describe(e.errors())) from None
        if req.model not in (None, self.args.gpt_name):
            raise ServeError(404, f"model {req.model!r} is not served; GET /v1/models lists the models", "not_found_error")
        if req.max_tokens > self.args.max_tokens_limit:
            raise ServeError(400, f"max_tokens is {req.max_tokens}; this server allows at most {self.args.max_tokens_limit}")
        jobs = [
            GenerationParams(prompt=p, max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, stop=req.stops(),
                             seed=None if req.seed is None else req.seed + i).model_dump()
            for i, p in enumerate(req.prompts())
        ]  # fmt: skip
        prompt_tokens = 0
        for job in jobs:
            prompt_tokens += raise_if_error(await self.gpt.check.remote(job))["prompt_tokens"]
        if req.stream:
            return StreamingResponse(self._stream(req, jobs), media_type="text/event-stream")
        results = await asyncio.gather(*(self._collect(job) for job in jobs))
        choices = [CompletionChoice(index=i, text=text, finish_reason=reason) for i, (text, reason, _) in enumerate(results)]
        completion_tokens = sum(n for _, _, n in results)
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)
        return CompletionResponse(model=self.args.gpt_name, choices=choices, usage=usage)

    async def _collect(self, job: dict[str, Any]) -> tuple[str, str | None, int]:
        text, reason, n = [], None, 0
        async for delta in self.gpt.options(stream=True).generate.remote(job):
            text.append(delta["text"])
            reason, n = delta["finish_reason"] or reason, delta["completion_tokens"]
        return "".join(text), reason, n

    async def _stream(self, req: CompletionRequest, jobs: list[dict[str, Any]]) -> AsyncIterator[str]:
        base = CompletionResponse(model=self.args.gpt_name, choices=[])
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, job: dict[str, Any]) -> None:
            try:
                async for delta in self.gpt.options(stream=True).generate.remote(job):
                    await queue.put((index, delta))
            finally:
                await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
        remaining = len(tasks)
        try:
            while remaining:
                index, delta = await queue.get()
                if delta is None:
                    remaining -= 1
                    continue
                if not delta["text"] and not delta["finish_reason"]:
                    continue
                chunk = base.model_copy(update={"choices": [CompletionChoice(index=index, text=delta["text"], finish_reason=delta["finish_reason"])]})
                yield f"data: {chunk.model_dump_json()}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()

    @api.post("/v1/classify")
    async def classify(self, request: Request, top_k: int = 3) -> ClassificationResponse:
        self._authorize(request)
        if self.resnet is None:
            raise ServeError(404, "no image classifier is served here", "not_found_error")
        if not 1 <= top_k <= 1000:
            raise ServeError(400, f"top_k must be between 1 and 1000, got {top_k}")
        image = await self._image_bytes(request)
        result = raise_if_error(await self.resnet.classify.remote(image, top_k))
        return ClassificationResponse(model=self.args.resnet_name, predictions=[ClassLabel(**p) for p in result["predictions"]])

    async def _image_bytes(self, request: Request) -> bytes:
        """The image from a raw JPEG/PNG body or a multipart 'file' field, within the byte limit."""
        limit = self.args.max_image_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit + 64_000:
            raise ServeError(413, f"body is {declared} bytes; images may be at most {limit} bytes", "payload_too_large")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            form = await request.form()
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ServeError(400, "multipart body needs a file field named 'file'")
            data = await upload.read()
        elif ctype in ("image/jpeg", "image/png", "application/octet-stream"):
            data = await request.body()
        else:
            raise ServeError(415, f"unsupported content type {ctype or '(none)'}; send image/jpeg, image/png or multipart/form-data", "unsupported_media_type")
        if not data:
            raise ServeError(400, "the request carries no image")
        if len(data) > limit:
            raise ServeError(413, f"image is {len(data)} bytes; at most {limit} are accepted", "payload_too_large")
        return data


def build_app(args: dict[str, Any] | AppArgs) -> serve.Application:
    """The Serve application for ``args`` (either model may be left out, not both)."""
    if not isinstance(args, AppArgs):
        args = AppArgs(**args)
    if not args.gpt_checkpoint and not args.resnet_checkpoint:
        raise ValueError("give gpt_checkpoint, resnet_checkpoint or both")
    # Pin relative paths here: replicas run in their own working directory.
    for name in ("gpt_checkpoint", "resnet_checkpoint"):
        value = getattr(args, name)
        if value and "://" not in value:
            setattr(args, name, str(Path(value).expanduser().resolve()))
    gpt = resnet = None
    if args.gpt_checkpoint:
        g = args.gpt
        gpt = GPTDeployment.options(**g.options(), user_config={"checkpoint": args.gpt_checkpoint}).bind(args.max_prompt_tokens, g.model_dump())
    if args.resnet_checkpoint:
        r = args.resnet
        resnet = ResNetDeployment.options(**r.options(), user_config={"checkpoint": args.resnet_checkpoint}).bind(args.max_image_pixels, r.model_dump())
    # The ingress gets no checkpoint paths: a model swap then leaves it untouched.
    ingress_args = args.model_dump(exclude={"gpt_checkpoint", "resnet_checkpoint"})
    return Ingress.bind(gpt, resnet, ingress_args, os.environ.get(args.api_key_env))
