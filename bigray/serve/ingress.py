"""The HTTP ingress: FastAPI routes in front of the model deployments, and nothing else.

A request is validated here, once, into typed objects (protocol.py) that go to the models as they
are. Client mistakes become OpenAI-style JSON errors with a 4xx status, never a 500.
"""

# No `from __future__ import annotations` here: FastAPI must see the route signatures' real types
# (a string annotation of `request: Request` turns it into a required query parameter).
import asyncio
import hmac
import json
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from bigray.serve.protocol import (
    Admitted,
    ClassificationResponse,
    ClassLabel,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorDetail,
    ErrorResponse,
    ModelCard,
    ModelList,
    ServeError,
    Usage,
)
from bigray.serve.settings import AppArgs

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


def _raise_if_error(result: Any) -> Any:
    """A model deployment returns client errors as values: raise them here, where they become HTTP."""
    if isinstance(result, ErrorDetail):
        raise ServeError.from_detail(result)
    return result


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
        streams = [self.gpt.options(stream=True).generate.remote(job) for job in req.generation_params()]
        try:
            # Each stream first says whether its prompt fits; any refusal refuses the request.
            admitted = [_raise_if_error(await s.__anext__()) for s in streams]
        except BaseException:
            for s in streams:
                s.cancel()
            raise
        prompt_tokens = sum(a.prompt_tokens for a in admitted if isinstance(a, Admitted))
        if req.stream:
            return StreamingResponse(self._stream(streams), media_type="text/event-stream")
        results = await asyncio.gather(*(self._collect(s) for s in streams))
        choices = [CompletionChoice(index=i, text=text, finish_reason=reason) for i, (text, reason, _) in enumerate(results)]
        completion_tokens = sum(n for _, _, n in results)
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)
        return CompletionResponse(model=self.args.gpt_name, choices=choices, usage=usage)

    async def _collect(self, stream: Any) -> tuple[str, str | None, int]:
        text, reason, n = [], None, 0
        async for delta in stream:
            text.append(delta.text)
            reason, n = delta.finish_reason or reason, delta.completion_tokens
        return "".join(text), reason, n

    async def _stream(self, streams: list[Any]) -> AsyncIterator[str]:
        base = CompletionResponse(model=self.args.gpt_name, choices=[])
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream: Any) -> None:
            try:
                async for delta in stream:
                    await queue.put((index, delta))
            finally:
                await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        remaining = len(tasks)
        try:
            while remaining:
                index, delta = await queue.get()
                if delta is None:
                    remaining -= 1
                    continue
                if not delta.text and not delta.finish_reason:
                    continue
                chunk = base.model_copy(update={"choices": [CompletionChoice(index=index, text=delta.text, finish_reason=delta.finish_reason)]})
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
        result = _raise_if_error(await self.resnet.classify.remote(image, top_k))
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
