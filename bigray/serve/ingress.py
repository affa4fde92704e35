"""The HTTP ingress: FastAPI routes in front of the model deployments, and nothing else.

A request is validated here, once, into typed objects (protocol.py) that go to the models as they
are. Client mistakes become OpenAI-style JSON errors with a 4xx status, never a 500.
"""

# No `from __future__ import annotations` here: FastAPI must see the route signatures' real types
# (a string annotation of `request: Request` turns it into a required query parameter).
import asyncio
import hmac
import json
import logging
import os
from pathlib import Path
from typing import Any, AsyncIterator, Callable, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from bigray.serve.protocol import (
    Admitted,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatReply,
    ClassificationResponse,
    ClassLabel,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Delta,
    ErrorDetail,
    ErrorResponse,
    GenerationParams,
    ModelCard,
    ModelList,
    ServeError,
    Usage,
)
from bigray.serve.settings import AppArgs

# No /docs, /redoc or /openapi.json: a production endpoint does not publish its schema to anyone who asks.
api = FastAPI(title="bigray", description="GPT completions and chat, and ResNet classification, on Ray Serve", docs_url=None, redoc_url=None, openapi_url=None)
log = logging.getLogger(__name__)

GenerationRequest = TypeVar("GenerationRequest", CompletionRequest, ChatCompletionRequest)


def _usage(prompt_tokens: int, results: list[tuple[str, str | None, int]]) -> Usage:
    completion_tokens = sum(n for _, _, n in results)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)


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
            raise ServeError(413, f"body is over {limit} bytes; this server accepts at most {limit}", "payload_too_large")
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
        raise ServeError(400, f"the multipart body cannot be parsed: {getattr(e, 'detail', None) or getattr(e, 'message', None) or e}") from None
    try:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ServeError(400, "multipart body needs a file field named 'file'")
        return await upload.read()
    finally:
        await form.close()


def read_api_key(args: AppArgs) -> str | None:
    """The API key clients must send, read where it is enforced (in the ingress replica): from
    ``api_key_file`` (whitespace around it stripped: files end in a newline) or the ``api_key_env``
    variable; None when neither is set."""
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text().strip()
        except OSError as e:
            raise RuntimeError(f"cannot read the API key file {args.api_key_file}: {e.strerror}") from None
        if not key:
            raise RuntimeError(f"the API key file {args.api_key_file} is empty")
        return key
    return (os.environ.get(args.api_key_env) or "").strip() or None


@serve.deployment(name="ingress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    def __init__(self, gpt: DeploymentHandle | None, resnet: DeploymentHandle | None, args: dict[str, Any], key_expected: bool = False):
        """``key_expected``: the process that built the app had the API key set, so a replica that
        cannot see it refuses to start (fail closed) rather than serve without one."""
        self.gpt, self.resnet = gpt, resnet
        self.args = AppArgs(**args)
        self.api_key = read_api_key(self.args)
        if self.api_key is None and key_expected:
            raise RuntimeError(
                f"{self.args.api_key_env} was set where the app was built, but this ingress replica does not see it: "
                "pass it to the replicas (the cluster's environment, a Kubernetes Secret, runtime_env env_vars) "
                "or use api_key_file; refusing to serve without the key"
            )
        if self.api_key is None:
            log.warning("no API key (%s or api_key_file): every client that reaches this port may use the models", self.args.api_key_env)

    def _authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise ServeError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error")

    async def _model_states(self) -> dict[str, Any]:
        models = {}
        for name, handle in (("gpt", self.gpt), ("resnet", self.resnet)):
            if handle is not None:
                models[name] = await asyncio.wait_for(handle.ready.remote(), timeout=5)
        return models

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """Liveness, and readiness once every model replica has loaded its checkpoint. Open to all,
        so it says no more than that (no checkpoint locations, no error text)."""
        try:
            models = await self._model_states()
        except Exception:  # not loaded yet, or a replica is restarting
            return JSONResponse(status_code=503, content={"status": "loading"})
        return JSONResponse(content={"status": "ok", "models": {name: "ready" for name in models}})

    @api.get("/v1/status")
    async def status(self, request: Request) -> JSONResponse:
        """What each model replica serves (checkpoint, refused swap) and its batching statistics."""
        self._authorize(request)
        try:
            return JSONResponse(content={"status": "ok", "models": await self._model_states()})
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
        req = await self._generation_request(request, CompletionRequest)
        prompts = req.prompts()
        if len(prompts) > self.args.max_prompts:
            raise ServeError(400, f"prompt is a list of {len(prompts)}; this server takes at most {self.args.max_prompts} per request")
        longest = max(map(len, prompts))
        if longest > self.args.max_prompt_chars:  # before tokenizing: the token cap is checked after
            raise ServeError(400, f"a prompt has {longest} characters; this server accepts at most {self.args.max_prompt_chars}")
        streams, prompt_tokens = await self._admit(req.generation_params())
        if req.stream:
            base = CompletionResponse(model=self.args.gpt_name, choices=[])

            def chunk(index: int, delta: Delta) -> BaseModel:
                return base.model_copy(update={"choices": [CompletionChoice(index=index, text=delta.text, finish_reason=delta.finish_reason)]})

            return StreamingResponse(self._stream(streams, chunk), media_type="text/event-stream")
        results = await asyncio.gather(*(self._collect(s) for s in streams))
        choices = [CompletionChoice(index=i, text=text, finish_reason=reason) for i, (text, reason, _) in enumerate(results)]
        return CompletionResponse(model=self.args.gpt_name, choices=choices, usage=_usage(prompt_tokens, results))

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        """The messages are rendered with the model's chat template by the GPT deployment (a model
        without one answers 400); sampling, stop strings, streaming and limits as for completions."""
        req = await self._generation_request(request, ChatCompletionRequest)
        if req.characters() > self.args.max_prompt_chars:
            raise ServeError(400, f"the messages have {req.characters()} characters; this server accepts at most {self.args.max_prompt_chars}")
        streams, prompt_tokens = await self._admit([req.generation_params()])
        if req.stream:
            base = ChatCompletionChunk(model=self.args.gpt_name, choices=[])

            def chunk(index: int, delta: Delta) -> BaseModel:
                choice = ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=delta.text), finish_reason=delta.finish_reason)
                return base.model_copy(update={"choices": [choice]})

            return StreamingResponse(self._stream(streams, chunk), media_type="text/event-stream")
        results = await asyncio.gather(*(self._collect(s) for s in streams))
        choices = [ChatChoice(index=i, message=ChatReply(content=text), finish_reason=reason) for i, (text, reason, _) in enumerate(results)]
        return ChatCompletionResponse(model=self.args.gpt_name, choices=choices, usage=_usage(prompt_tokens, results))

    async def _generation_request(self, request: Request, schema: type[GenerationRequest]) -> GenerationRequest:
        """The authorized, validated body of a generation route, for the served GPT and within max_tokens."""
        self._authorize(request)
        if self.gpt is None:
            raise ServeError(404, "no GPT model is served here", "not_found_error")
        body = await _json_body(request, self.args.max_body_bytes)
        try:
            req = schema.model_validate(body)
        except ValidationError as e:
            raise ServeError(400, _describe(e.errors())) from None
        if req.model not in (None, self.args.gpt_name):
            raise ServeError(404, f"model {req.model!r} is not served; GET /v1/models lists the models", "not_found_error")
        if req.requested_tokens() > self.args.max_tokens_limit:
            raise ServeError(400, f"max_tokens is {req.requested_tokens()}; this server allows at most {self.args.max_tokens_limit}")
        return req

    async def _admit(self, jobs: list[GenerationParams]) -> tuple[list[Any], int]:
        """One stream per job from the GPT deployment, once every job's prompt was tokenized and fits
        (any refusal refuses the request); and the prompts' token count."""
        # A full model queue (its max_queued_requests) raises Serve's BackPressureError here, which
        # Serve answers 429 with Retry-After (settings.DeploymentArgs.options: backpressure_config).
        streams = [self.gpt.options(stream=True).generate.remote(job) for job in jobs]
        try:
            admitted = [_raise_if_error(await s.__anext__()) for s in streams]
        except BaseException:
            for s in streams:
                s.cancel()
            raise
        return streams, sum(a.prompt_tokens for a in admitted if isinstance(a, Admitted))

    async def _collect(self, stream: Any) -> tuple[str, str | None, int]:
        text, reason, n = [], None, 0
        async for delta in stream:
            if delta.error:
                raise ServeError(500, delta.error, "server_error")
            text.append(delta.text)
            reason, n = delta.finish_reason or reason, delta.completion_tokens
        return "".join(text), reason, n

    async def _stream(self, streams: list[Any], chunk: Callable[[int, Delta], BaseModel]) -> AsyncIterator[str]:
        """Server-sent events of every stream's Deltas as they come (``chunk`` shapes one), then [DONE]."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream: Any) -> None:
            try:
                async for delta in stream:
                    await queue.put((index, delta))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the replica failed or went away mid-stream
                log.error("stream %d failed: %s", index, e)
                await queue.put((index, Delta("", "error", error=f"generation failed: {type(e).__name__}")))
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
                if delta.error:  # an error event, and no [DONE]: the client must not take this as complete
                    error = ErrorResponse(error=ErrorDetail(message=f"choice {index}: {delta.error}", type="server_error", code=500))
                    yield f"data: {error.model_dump_json()}\n\n"
                    return
                if not delta.text and not delta.finish_reason:
                    continue
                yield f"data: {chunk(index, delta).model_dump_json()}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnected: cancelling the streams frees their batch rows
            for t in tasks:
                t.cancel()
            for s in streams:
                s.cancel()

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
        """The image from a raw JPEG/PNG body or a multipart 'file' field, within the byte limit
        (the body is capped as it is read: a chunked upload or a multipart part cannot pass it)."""
        limit = self.args.max_image_bytes
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            data = await _multipart_file(request, await _read_body(request, limit + 64_000))
        elif ctype in ("image/jpeg", "image/png", "application/octet-stream"):
            data = await _read_body(request, limit)
        else:
            raise ServeError(415, f"unsupported content type {ctype or '(none)'}; send image/jpeg, image/png or multipart/form-data", "unsupported_media_type")
        if not data:
            raise ServeError(400, "the request carries no image")
        if len(data) > limit:
            raise ServeError(413, f"image is {len(data)} bytes; at most {limit} are accepted", "payload_too_large")
        return data
