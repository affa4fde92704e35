"""The model deployments: a GPT and a ResNet replica class, each batching with ``@serve.batch``.

Replicas get their checkpoint as ``user_config`` (so a new checkpoint is an in-place swap) and
their numbers from :class:`~bigray.serve.settings.DeploymentArgs`. Client errors are returned as
values (``ErrorDetail``), not raised: an exception crossing a handle loses its type.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import Any, AsyncIterator, Iterator

from ray import serve

from bigray.artifacts.locate import ServedModel, served_model
from bigray.serve.protocol import Admitted, Delta, ErrorDetail, GenerationParams, ServeError
from bigray.serve.runners import ClassifierRunner, GPTRunner, Prompt
from bigray.serve.settings import DeploymentArgs

log = logging.getLogger(__name__)


class SwappableModel:
    """A model replica whose checkpoint arrives as user_config ``{"checkpoint": path}``.

    Pointing a running app at a new checkpoint is then an in-place reconfigure: the old model
    answers until the new one has loaded, then they swap. Subclasses say how to load a runner.

    The ``@serve.batch`` size and wait come from the deployment's settings (set here, in
    ``__init__``). Requests enter the batch queue only while the model is idle. Serve's batch loop
    (Ray 2.60, since ``max_concurrent_batches`` exists) forms the next batch while the previous one
    still runs, from whatever arrived within ``batch_wait_timeout_s``; under load that queued
    batches of 1-2 behind the model (bench/README.md). Held back here, everything that arrived
    during a forward pass goes into the next batch together: batches grow with the backlog, and a
    request reaching an idle replica goes straight into the batch queue.
    """

    def __init__(self, settings: dict[str, Any]):
        import torch

        self.settings = DeploymentArgs(**settings)
        torch.set_num_threads(max(1, int(self.settings.num_cpus)))
        self.runner: Any = None
        self.checkpoint: str | None = None
        self.refused: dict[str, str] | None = None
        self.served: ServedModel | None = None
        self._batched.set_max_batch_size(self.settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        self._model_idle = asyncio.Event()
        self._model_idle.set()
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.poisoned: str | None = None

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
        """How well batching works here (shown by /v1/status): batches run, requests in them, the largest."""
        batches, requests = sum(self.batch_sizes.values()), sum(k * n for k, n in self.batch_sizes.items())
        return {"batches": batches, "requests": requests, "largest": max(self.batch_sizes, default=0)}

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
        """What the loaded model tells /healthz about itself."""
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
        the refusal in /healthz (``refused``), so a bad redeploy costs no request."""
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
    """Text generation; concurrent prompts are decoded together (shared forward passes + KV cache)."""

    kind = "gpt"

    def __init__(self, max_prompt_tokens: int, settings: dict[str, Any]):
        self.max_prompt_tokens = max_prompt_tokens
        super().__init__(settings)

    def load(self, served: ServedModel) -> GPTRunner:
        return GPTRunner(served.model_dir, self.max_prompt_tokens, self.settings.dtype, self.settings.num_gpus > 0)

    def describe(self) -> dict[str, Any]:
        return {"context": self.runner.max_positions}

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
        await self._model_idle.wait()
        try:
            async for delta in self._batched((runner, prompt)):
                yield delta
        finally:  # finished, or cancelled because the client disconnected
            prompt.cancelled.set()

    def stats(self) -> dict[str, Any]:
        return {**self.batch_stats(), "decoding": self.decoding}

    decoding = 0
    """Rows the current batch is still decoding (a finished or cancelled row no longer counts)."""

    @serve.batch()  # sizes come from the settings, set in SwappableModel.__init__
    async def _batched(self, batch: list[tuple[GPTRunner, Prompt]]) -> AsyncIterator[list[Any]]:
        # Around a swap one batch may hold prompts checked by the old and by the new model: each
        # group decodes on its own model, step by step together.
        groups: dict[int, tuple[GPTRunner, list[int]]] = {}
        for i, (runner, _) in enumerate(batch):
            groups.setdefault(id(runner), (runner, []))[1].append(i)
        decoders = [(runner.generate([batch[i][1] for i in idx]), idx) for runner, idx in groups.values()]
        with self._model_busy(len(batch)):
            try:
                out: list[Any] = [None] * len(batch)
                while decoders:
                    # each decode step runs off the event loop, so the replica keeps accepting requests
                    steps = await asyncio.to_thread(lambda: [next(d, None) for d, _ in decoders])
                    live = []
                    for (decoder, idx), step in zip(decoders, steps):
                        if step is None:
                            for i in idx:
                                out[i] = None
                            continue
                        live.append((decoder, idx))
                        for i, d in zip(idx, step):
                            out[i] = d
                    decoders = live
                    self.decoding = sum(d is not None for d in out)
                    if not decoders:
                        return
                    yield [StopIteration if d is None else d for d in out]
            except Exception as e:
                self._note_failure(e)
                raise
            finally:
                self.decoding = 0


@serve.deployment(name="resnet")
class ResNetDeployment(SwappableModel):
    """Image classification with dynamic batching (@serve.batch)."""

    kind = "resnet"

    def __init__(self, max_image_pixels: int, settings: dict[str, Any]):
        self.max_image_pixels = max_image_pixels
        super().__init__(settings)

    def load(self, served: ServedModel) -> ClassifierRunner:
        return ClassifierRunner(served.model_dir, self.max_image_pixels, self.settings.dtype, self.settings.num_gpus > 0)

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
        return {"predictions": [{"label": names[i], "index": int(i), "score": float(s)} for s, i in zip(scores.tolist(), idx.tolist())]}

    def stats(self) -> dict[str, Any]:
        return self.batch_stats()

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
