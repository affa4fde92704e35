"""The model deployments: GPT with continuous batching (its own decode loop), ResNet with ``@serve.batch``.

Replicas get their checkpoint as ``user_config`` (so a new checkpoint is an in-place swap) and
their numbers from :class:`~bigray.serve.settings.DeploymentArgs`. Client errors are returned as
values (``ErrorDetail``), not raised: an exception crossing a handle loses its type.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import Any, AsyncIterator, Callable, Iterator

from ray import serve

from bigray.artifacts.locate import ServedModel, served_model
from bigray.serve.protocol import Admitted, Delta, ErrorDetail, GenerationParams, ServeError
from bigray.serve.runners import ClassifierRunner, DecodeBatch, GPTRunner, Prompt, joinable
from bigray.serve.settings import DeploymentArgs

log = logging.getLogger(__name__)


class SwappableModel:
    """A model replica whose checkpoint arrives as user_config ``{"checkpoint": path}``.

    Pointing a running app at a new checkpoint is then an in-place reconfigure: the old model
    answers until the new one has loaded, then they swap. Subclasses say how to load a runner.
    """

    def __init__(self, settings: dict[str, Any]):
        import torch

        self.settings = DeploymentArgs(**settings)
        torch.set_num_threads(max(1, int(self.settings.num_cpus)))
        self.runner: Any = None
        self.checkpoint: str | None = None
        self.refused: dict[str, str] | None = None
        self.served: ServedModel | None = None
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        """How many times the model ran a batch of each size (GPT: rows per decode step)."""
        self.poisoned: str | None = None

    def batch_counts(self) -> tuple[int, int, int]:
        """(batches run, items in them, the largest batch) from ``batch_sizes``."""
        return (
            sum(self.batch_sizes.values()),
            sum(k * n for k, n in self.batch_sizes.items()),
            max(self.batch_sizes, default=0),
        )

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose device failed is restarted, not kept."""
        if self.poisoned:
            raise RuntimeError(f"this replica's device failed: {self.poisoned}")

    def _note_failure(self, e: BaseException) -> None:
        """A failure outside any one request: on a GPU it may leave the device unusable (a device-side
        assert poisons the CUDA context), so the replica reports unhealthy and Serve replaces it."""
        if self.settings.num_gpus > 0 and "CUDA" in str(e):
            self.poisoned = str(e)[:300]

    kind = ""
    """The checkpoint kind this deployment serves (gpt, resnet)."""

    def load(self, served: ServedModel) -> Any:
        """A runner for the local copy of a checked model."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What the loaded model tells /v1/status about itself."""
        return {}

    def ready(self) -> dict[str, Any]:
        """/v1/status's view of this replica (raises until a model is loaded)."""
        if self.runner is None:
            raise RuntimeError("no model loaded yet")
        return {"checkpoint": self.checkpoint, "refused": self.refused, **self.describe(), **self.stats()}

    def stats(self) -> dict[str, Any]:
        raise NotImplementedError

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load the checkpoint. A replica with nothing loaded yet fails with the reason (shown by
        `serve status`); a swap whose checkpoint is refused keeps the loaded model serving and reports
        the refusal in /v1/status (``refused``), so a bad redeploy costs no request."""
        path = user_config["checkpoint"]
        if path == self.checkpoint:
            return
        served = None
        try:
            served = served_model(path, self.kind, _cache_area())
            runner = self.load(served)
        except Exception as e:  # CheckpointError, StorageError, or anything else that stops the new model loading
            if served is not None and served.source != getattr(self.served, "source", None):
                served.release()
            if self.runner is None:
                raise
            log.error("refused to swap to %s, still serving %s: %s", path, self.checkpoint, e)
            self.refused = {"checkpoint": path, "reason": str(e)[:500]}
            return
        previous, self.served = self.served, served
        self.runner, self.checkpoint, self.refused = runner, path, None
        if previous is not None and previous.source != served.source:
            previous.release()  # the swapped-out model's local copy

    def __del__(self) -> None:
        """Serve shuts the replica down: its local copy of the model goes too."""
        if getattr(self, "served", None) is not None:
            self.served.release()


def _cache_area() -> str:
    """This replica's part of the node cache: one per live replica of a deployment on a node (its
    local rank), so replicas never delete each other's files and a replacement reuses its copy."""
    try:
        ctx = serve.get_replica_context()
        return f"serve/{ctx.app_name}.{ctx.deployment}.{ctx.rank.local_rank}"
    except Exception:  # not inside a Serve replica (a runner used directly)
        return "serve/local"


@serve.deployment(name="gpt")
class GPTDeployment(SwappableModel):
    """Text generation with continuous batching: a request joins the running decode batch at the
    next step and leaves it when it finishes or its client goes away (runners.DecodeBatch), so a
    new request never waits for the longest one in flight. One decode loop per replica runs while
    there is work; each iteration decodes one token for every row, then prefills the arrivals
    (up to ``max_batch_size`` rows), off the event loop."""

    kind = "gpt"

    def __init__(self, max_prompt_tokens: int, settings: dict[str, Any]):
        self.max_prompt_tokens = max_prompt_tokens
        super().__init__(settings)
        self.waiting: collections.deque[tuple[GPTRunner, Prompt]] = collections.deque()
        self.sinks: dict[int, asyncio.Queue] = {}
        """id(prompt) -> the queue its request reads its Deltas from."""
        self.batches: dict[int, DecodeBatch] = {}
        """id(runner) -> its decode batch: around a swap, prompts checked by the old model finish on it."""
        self.decoder: asyncio.Task | None = None
        self.decoding = 0
        self.cancelled = 0

    def load(self, served: ServedModel) -> GPTRunner:
        return GPTRunner(served.model_dir, self.max_prompt_tokens, self.settings.dtype, self.settings.num_gpus > 0)

    def describe(self) -> dict[str, Any]:
        return {"context": self.runner.max_positions}

    def stats(self) -> dict[str, Any]:
        steps, rows, largest = self.batch_counts()
        return {
            "steps": steps,
            "rows_decoded": rows,
            "largest": largest,
            "decoding": self.decoding,
            "waiting": len(self.waiting),
            "cancelled": self.cancelled,
        }

    async def generate(self, job: GenerationParams) -> AsyncIterator[Admitted | ErrorDetail | Delta]:
        """First :class:`Admitted` (the prompt was tokenized, once, and fits) or the client error; then the Deltas.

        The prompt is decoded by the model that checked it, even if a swap happens meanwhile (a
        shorter context could otherwise overflow); a client that goes away cancels its row.
        """
        runner = self.runner
        try:
            prompt = runner.encode(job)
        except ServeError as e:
            yield e.detail()
            return
        yield Admitted(prompt_tokens=len(prompt.ids))
        sink: asyncio.Queue = asyncio.Queue()
        self.sinks[id(prompt)] = sink
        self.waiting.append((runner, prompt))
        if self.decoder is None:
            self.decoder = asyncio.get_running_loop().create_task(self._decode_loop())
        try:
            while True:
                delta = await sink.get()
                yield delta
                if delta.finish_reason:
                    return
        finally:  # finished, or cancelled because the client disconnected
            if not prompt.cancelled.is_set() and id(prompt) in self.sinks:
                prompt.cancelled.set()
            self.sinks.pop(id(prompt), None)

    async def _decode_loop(self) -> None:
        try:
            while self.waiting or any(self.batches.values()):
                while self.waiting and self.waiting[0][1].cancelled.is_set():
                    self.waiting.popleft()  # its client left before it started
                room = joinable(sum(map(len, self.batches.values())), self.settings.max_batch_size, len(self.waiting))
                arrivals = [self.waiting.popleft() for _ in range(room)]
                for prompt, delta in await asyncio.to_thread(self._iteration, arrivals):
                    sink = self.sinks.get(id(prompt))
                    if sink is not None:
                        sink.put_nowait(delta)
                        if delta.finish_reason:
                            del self.sinks[id(prompt)]
        finally:
            self.decoder = None

    def _iteration(self, arrivals: list[tuple[GPTRunner, Prompt]]) -> list[tuple[Prompt, Delta]]:
        """One decode step for every running row, then the arrivals' prefill (in a worker thread).
        A batch whose model call fails fails its own rows, with an error Delta each."""
        produced: list[tuple[Prompt, Delta]] = []
        cancelled_before = {key: batch.cancelled for key, batch in self.batches.items()}
        for key, batch in list(self.batches.items()):
            if batch:
                produced += self._guarded(key, batch, batch.step)
        groups: dict[int, tuple[GPTRunner, list[Prompt]]] = {}
        for runner, prompt in arrivals:
            groups.setdefault(id(runner), (runner, []))[1].append(prompt)
        for key, (runner, prompts) in groups.items():
            batch = self.batches.setdefault(key, DecodeBatch(runner))
            produced += self._guarded(key, batch, lambda: batch.add(prompts), prompts)
        self.cancelled += sum(b.cancelled - cancelled_before.get(key, 0) for key, b in self.batches.items())
        for key in [k for k, b in self.batches.items() if not b]:
            del self.batches[key]  # an emptied batch (and a swapped-out model with it) is let go
        self.decoding = sum(map(len, self.batches.values()))
        if produced:
            self.batch_sizes[len(produced)] += 1
        return produced

    def _guarded(
        self, key: int, batch: DecodeBatch, run: Callable[[], list[tuple[Prompt, Delta]]], joining: list[Prompt] = ()
    ) -> list[tuple[Prompt, Delta]]:
        try:
            return run()
        except Exception as e:
            log.exception("a decode step failed; failing its %d rows", len(batch) + len(joining))
            self._note_failure(e)
            failed = [row.prompt for row in batch.rows] + list(joining)
            self.batches.pop(key, None)
            return [(p, Delta("", "error", error=f"generation failed: {type(e).__name__}")) for p in failed]


@serve.deployment(name="resnet")
class ResNetDeployment(SwappableModel):
    """Image classification with dynamic batching (@serve.batch)."""

    kind = "resnet"

    def __init__(self, max_image_pixels: int, settings: dict[str, Any]):
        self.max_image_pixels = max_image_pixels
        super().__init__(settings)
        self._batched.set_max_batch_size(self.settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        self._model_idle = asyncio.Event()
        self._model_idle.set()

    @contextlib.contextmanager
    def _model_busy(self, batch_size: int) -> Iterator[None]:
        """Wrap a batch's model work: requests arriving meanwhile wait for the next batch.

        Serve's batch loop (Ray 2.60, since ``max_concurrent_batches`` exists) forms the next batch
        while the previous one still runs, from whatever arrived within ``batch_wait_timeout_s``;
        under load that queued batches of 1-2 behind the model (bench/README.md). Held back here,
        everything that arrived during a forward pass goes into the next batch together: batches
        grow with the backlog, and a request reaching an idle replica goes straight in.
        """
        self.batch_sizes[batch_size] += 1
        self._model_idle.clear()
        try:
            yield
        finally:
            self._model_idle.set()

    def load(self, served: ServedModel) -> ClassifierRunner:
        return ClassifierRunner(
            served.model_dir, self.max_image_pixels, self.settings.dtype, self.settings.num_gpus > 0
        )

    def describe(self) -> dict[str, Any]:
        return self.runner.describe()

    async def classify(self, image: bytes, top_k: int) -> dict[str, Any] | ErrorDetail:
        """Top-k labels, or the client error. Decoding runs off the event loop (a large image takes
        a while), and the image is classified by the model whose size it was prepared for."""
        runner = self.runner
        try:
            x = await asyncio.to_thread(runner.preprocess, image)
        except ServeError as e:
            return e.detail()
        await self._model_idle.wait()
        probs = await self._batched((runner, x))
        k = min(top_k, len(probs))
        scores, idx = probs.topk(k)
        names = runner.class_names
        return {
            "predictions": [
                {"label": names[i], "index": int(i), "score": float(s)} for s, i in zip(scores.tolist(), idx.tolist())
            ]
        }

    def stats(self) -> dict[str, Any]:
        batches, requests, largest = self.batch_counts()
        return {"batches": batches, "requests": requests, "largest": largest}

    @serve.batch()  # sizes come from the settings, set in SwappableModel.__init__
    async def _batched(self, images: list[tuple[ClassifierRunner, Any]]) -> list[Any]:
        import torch

        out: list[Any] = [None] * len(images)
        groups: dict[int, tuple[ClassifierRunner, list[int]]] = {}
        for i, (runner, _) in enumerate(images):
            groups.setdefault(id(runner), (runner, []))[1].append(i)
        with self._model_busy(len(images)):
            try:
                for runner, idx in groups.values():
                    probs = await asyncio.to_thread(runner.classify, torch.stack([images[i][1] for i in idx]))
                    for i, p in zip(idx, probs):
                        out[i] = p
            except Exception as e:
                self._note_failure(e)
                raise
        return out
