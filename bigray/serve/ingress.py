"""The HTTP ingress: FastAPI routes and authorization in front of the model deployments.

A body is read within its size cap and validated here, once, into typed objects (protocol.py);
generation is served by serving.py and classification by the ResNet deployment. Client mistakes
become OpenAI-style JSON errors with a 4xx status, never a 500.
"""

# No `from __future__ import annotations` here: FastAPI must see the route signatures' real types
# (a string annotation of `request: Request` turns it into a required query parameter).
import asyncio
import hmac
import json
import logging
import os
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from bigray.cluster import read_secret_files
from bigray.serve.protocol import (
    ChatCompletionRequest,
    ClassificationResponse,
    ClassLabel,
    CompletionRequest,
    ErrorDetail,
    ErrorResponse,
    ModelCard,
    ModelList,
    ServeError,
    raise_if_error,
    refused_when_full,
)
from bigray.serve.serving import GPTServing
from bigray.serve.settings import AppArgs

# No /docs, /redoc or /openapi.json: a production endpoint does not publish its schema to anyone who asks.
api = FastAPI(
    title="bigray",
    description="GPT completions and chat, and ResNet classification, on Ray Serve",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)
log = logging.getLogger(__name__)

READINESS_REFRESH_S = 1.0
"""How often each ingress replica asks the models whether they are ready (for /healthz)."""

Body = TypeVar("Body", bound=BaseModel)


def error_response(status: int, message: str, type_: str, retry_after_s: float | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(message=message, type=type_, code=status))
    headers = {"Retry-After": str(max(1, round(retry_after_s)))} if retry_after_s is not None else None
    return JSONResponse(status_code=status, content=body.model_dump(), headers=headers)


@api.exception_handler(ServeError)
async def _serve_error(_: Request, exc: ServeError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.type, exc.retry_after_s)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(400, _describe(exc.errors()), "invalid_request_error")


def _describe(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, read as it arrives and refused as soon as it passes ``limit`` bytes, whether or not
    the client declared its length (a chunked upload declares none)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ServeError(413, f"body is {declared} bytes; this server accepts at most {limit}", "payload_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServeError(
                413, f"body is over {limit} bytes; this server accepts at most {limit}", "payload_too_large"
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def _json_body(request: Request, limit: int) -> Any:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("application/json", ""):
        raise ServeError(415, f"unsupported content type {ctype}; send application/json", "unsupported_media_type")
    raw = await _read_body(request, limit)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # ValueError includes invalid UTF-8; RecursionError: nesting too deep
        raise ServeError(400, "the body is not valid JSON (UTF-8, not nested too deeply)") from None
    if not isinstance(body, dict):
        raise ServeError(400, "the body must be a JSON object")
    return body


async def _multipart_file(request: Request, body: bytes) -> bytes:
    """The 'file' field of a multipart body that was already read (so its size is already capped)."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
    except Exception as e:  # starlette's MultiPartException, HTTPException (too many parts), a missing boundary
        raise ServeError(
            400,
            f"the multipart body cannot be parsed: {getattr(e, 'detail', None) or getattr(e, 'message', None) or e}",
        ) from None
    try:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ServeError(400, "multipart body needs a file field named 'file'")
        return await upload.read()
    finally:
        await form.close()


def read_key(file: str | None, env: str) -> str | None:
    """A key clients must send, read where it is enforced (in the ingress replica): from ``file``
    (whitespace around it stripped: files end in a newline) or the ``env`` variable; None when
    neither is set."""
    if file:
        try:
            key = Path(file).read_text().strip()
        except OSError as e:
            raise RuntimeError(f"cannot read the key file {file}: {e.strerror}") from None
        if not key:
            raise RuntimeError(f"the key file {file} is empty")
        return key
    return (os.environ.get(env) or "").strip() or None


DETAILS = ("checkpoint", "refused")
"""What /v1/status shows only to the admin key (or on a server without keys): where models come from."""


@serve.deployment(name="ingress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        gpt: DeploymentHandle | None,
        resnet: DeploymentHandle | None,
        args: dict[str, Any],
        key_expected: bool = False,
    ):
        """``key_expected``: the process that built the app had the API key set, so a replica that
        cannot see it refuses to start (fail closed) rather than serve without one."""
        self.gpt, self.resnet = gpt, resnet
        self.args = AppArgs(**args)
        self.serving = GPTServing(gpt, self.args) if gpt is not None else None
        read_secret_files()  # BIGRAY_API_KEY_FILE, as every bigray process reads it
        self.api_key = read_key(self.args.api_key_file, self.args.api_key_env)
        self.admin_key = read_key(self.args.admin_key_file, self.args.admin_key_env)
        if self.api_key is None and key_expected:
            raise RuntimeError(
                f"{self.args.api_key_env} was set where the app was built, but this ingress replica does not see it: "
                "pass it to the replicas (the nodes' environment, a Kubernetes Secret, BIGRAY_API_KEY_FILE) "
                "or use api_key_file; refusing to serve without the key"
            )
        if self.api_key is None and not self.args.allow_unauthenticated:
            raise RuntimeError(
                f"no API key ({self.args.api_key_env} or api_key_file) and allow_unauthenticated is not set: "
                "refusing to serve every route to anyone who reaches the port (set a key, or "
                "allow_unauthenticated: true in the app's args on a network you trust)"
            )
        if self.api_key is None:
            log.warning("no API key, allow_unauthenticated: every client that reaches this port may use the models")
        self.ready: dict[str, str] | None = None
        """Each model's readiness as last seen by the background refresh (None: not seen yet)."""
        self._refresh: asyncio.Task | None = None

    def _authorize(self, request: Request) -> bool:
        """Refuse a request without the API key; True for an administrator: the admin key, or anyone
        on a server with no keys at all."""
        header = request.headers.get("authorization", "")
        token = (header[7:].strip() if header.lower().startswith("bearer ") else "").encode()
        if self.admin_key and hmac.compare_digest(token, self.admin_key.encode()):
            return True
        if self.api_key is None:  # allow_unauthenticated
            return self.admin_key is None
        if not hmac.compare_digest(token, self.api_key.encode()):
            raise ServeError(
                401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error"
            )
        return False

    async def _model_states(self) -> dict[str, Any]:
        models = {}
        for name, handle in (("gpt", self.gpt), ("resnet", self.resnet)):
            if handle is not None:
                models[name] = await asyncio.wait_for(handle.ready.remote(), timeout=5)
        return models

    async def _refresh_readiness(self) -> None:
        while True:
            try:
                self.ready = {name: "ready" for name in await self._model_states()}
            except Exception:  # not loaded yet, or a replica is restarting
                self.ready = None
            await asyncio.sleep(READINESS_REFRESH_S)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """Liveness, and readiness once every model replica has loaded its checkpoint. Open to all,
        so it says no more than that (no checkpoint locations, no error text), and it answers from
        the background refresh: anonymous checks never reach the models' queues."""
        if self._refresh is None:  # started on the first check, inside the replica's event loop
            self._refresh = asyncio.create_task(self._refresh_readiness())
        if self.ready is None:
            return JSONResponse(status_code=503, content={"status": "loading"})
        return JSONResponse(content={"status": "ok", "models": self.ready})

    @api.get("/v1/status")
    async def status(self, request: Request) -> JSONResponse:
        """Each model replica's batching statistics, and for an administrator what it serves (checkpoint,
        refused swap)."""
        admin = self._authorize(request)
        try:
            models = await self._model_states()
            if not admin:
                models = {name: {k: v for k, v in state.items() if k not in DETAILS} for name, state in models.items()}
            return JSONResponse(content={"status": "ok", "models": models})
        except Exception as e:
            raise ServeError(503, f"a model is not ready: {type(e).__name__}", "service_unavailable") from None

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
        return await self._gpt(request).completions(await self._body(request, CompletionRequest))

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        return await self._gpt(request).chat(await self._body(request, ChatCompletionRequest))

    def _gpt(self, request: Request) -> GPTServing:
        self._authorize(request)
        if self.serving is None:
            raise ServeError(404, "no GPT model is served here", "not_found_error")
        return self.serving

    async def _body(self, request: Request, schema: type[Body]) -> Body:
        """The validated JSON body of a route."""
        try:
            return schema.model_validate(await _json_body(request, self.args.max_body_bytes))
        except ValidationError as e:
            raise ServeError(400, _describe(e.errors())) from None

    @api.post("/v1/classify")
    async def classify(self, request: Request, top_k: int = 3) -> ClassificationResponse:
        self._authorize(request)
        if self.resnet is None:
            raise ServeError(404, "no image classifier is served here", "not_found_error")
        if not 1 <= top_k <= 1000:
            raise ServeError(400, f"top_k must be between 1 and 1000, got {top_k}")
        image = await self._image_bytes(request)
        with refused_when_full(self.args.resnet_name):
            result = raise_if_error(await self.resnet.classify.remote(image, top_k))
        return ClassificationResponse(
            model=self.args.resnet_name, predictions=[ClassLabel(**p) for p in result["predictions"]]
        )

    async def _image_bytes(self, request: Request) -> bytes:
        """The image from a raw JPEG/PNG body or a multipart 'file' field, within the byte limit
        (the body is capped as it is read: a chunked upload or a multipart part cannot pass it)."""
        limit = self.args.max_image_bytes
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            data = await _multipart_file(request, await _read_body(request, limit + 64_000))
        elif ctype in ("image/jpeg", "image/png", "application/octet-stream"):
            data = await _read_body(request, limit)
        else:
            raise ServeError(
                415,
                f"unsupported content type {ctype or '(none)'}; send image/jpeg, image/png or multipart/form-data",
                "unsupported_media_type",
            )
        if not data:
            raise ServeError(400, "the request carries no image")
        if len(data) > limit:
            raise ServeError(413, f"image is {len(data)} bytes; at most {limit} are accepted", "payload_too_large")
        return data
