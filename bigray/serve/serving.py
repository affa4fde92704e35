"""GPT serving behind the routes: a validated request turns itself into jobs within the server's
limits (protocol.py), the GPT deployment admits them (every prompt tokenized and fitting, or the
request is refused), and their Deltas come back collected into one response or streamed as
server-sent events.

The split is vLLM's: protocol (schemas) -> serving (this) -> the ingress (routes and auth).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator, Callable

from fastapi.responses import StreamingResponse
from pydantic import BaseModel
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
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Delta,
    ErrorDetail,
    ErrorResponse,
    GenerationParams,
    SamplingRequest,
    ServeError,
    Usage,
    raise_if_error,
    refused_when_full,
)
from bigray.serve.settings import AppArgs

log = logging.getLogger(__name__)

Results = list[tuple[str, str | None, int]]
"""Each job's text, finish reason and completion tokens."""


class GPTServing:
    """The completions and chat completions of the one served GPT model."""

    def __init__(self, gpt: DeploymentHandle, args: AppArgs):
        self.gpt, self.args = gpt, args

    async def completions(self, req: CompletionRequest) -> CompletionResponse | StreamingResponse:
        streams, prompt_tokens = await self._admit(req)
        if req.stream:
            base = CompletionResponse(model=self.args.gpt_name, choices=[])

            def chunk(index: int, delta: Delta) -> BaseModel:
                return base.model_copy(
                    update={
                        "choices": [CompletionChoice(index=index, text=delta.text, finish_reason=delta.finish_reason)]
                    }
                )

            return StreamingResponse(self._stream(streams, chunk), media_type="text/event-stream")
        results = await asyncio.gather(*(self._collect(s) for s in streams))
        choices = [
            CompletionChoice(index=i, text=text, finish_reason=reason) for i, (text, reason, _) in enumerate(results)
        ]
        return CompletionResponse(model=self.args.gpt_name, choices=choices, usage=_usage(prompt_tokens, results))

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse | StreamingResponse:
        """The messages are rendered with the model's chat template by the GPT deployment (a model
        without one answers 400)."""
        streams, prompt_tokens = await self._admit(req)
        if req.stream:
            base = ChatCompletionChunk(model=self.args.gpt_name, choices=[])

            def chunk(index: int, delta: Delta) -> BaseModel:
                choice = ChatChunkChoice(
                    index=index,
                    delta=ChatDelta(role="assistant", content=delta.text),
                    finish_reason=delta.finish_reason,
                )
                return base.model_copy(update={"choices": [choice]})

            return StreamingResponse(self._stream(streams, chunk), media_type="text/event-stream")
        results = await asyncio.gather(*(self._collect(s) for s in streams))
        choices = [
            ChatChoice(index=i, message=ChatReply(content=text), finish_reason=reason)
            for i, (text, reason, _) in enumerate(results)
        ]
        return ChatCompletionResponse(model=self.args.gpt_name, choices=choices, usage=_usage(prompt_tokens, results))

    async def _admit(self, req: SamplingRequest) -> tuple[list[Any], int]:
        """One stream per job from the GPT deployment, once every job's prompt was tokenized and fits
        (any refusal refuses the request); and the prompts' token count."""
        if req.model not in (None, self.args.gpt_name):
            raise ServeError(
                404, f"model {req.model!r} is not served; GET /v1/models lists the models", "not_found_error"
            )
        jobs: list[GenerationParams] = req.jobs(self.args)
        streams: list[Any] = []
        try:
            with refused_when_full(self.args.gpt_name):  # its queue is full: a 429 with Retry-After
                streams.extend(self.gpt.options(stream=True).generate.remote(job) for job in jobs)
                admitted = [raise_if_error(await s.__anext__()) for s in streams]
        except BaseException:
            for s in streams:
                with contextlib.suppress(Exception):  # a stream Serve refused raises its refusal again
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
                    error = ErrorResponse(
                        error=ErrorDetail(message=f"choice {index}: {delta.error}", type="server_error", code=500)
                    )
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


def _usage(prompt_tokens: int, results: Results) -> Usage:
    completion_tokens = sum(n for _, _, n in results)
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )
