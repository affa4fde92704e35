"""Model runners: plain torch serving logic (no Ray), loaded from a checkpoint directory alone.

:class:`GPTRunner` tokenizes and checks each prompt once (:meth:`GPTRunner.encode`), then decodes
many prompts together with a KV cache, each with its own sampling settings, seed, length limit and
stop strings; :class:`ClassifierRunner` preprocesses images exactly as training did and classifies
a batch. Weights come from safetensors only.
"""

from __future__ import annotations

import io
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch

from bigray.artifacts.adapter import base_of, is_adapter, merged
from bigray.artifacts.chat import ChatTemplateError, chat_prompt, chat_tokens
from bigray.artifacts.checkpoint import model_files
from bigray.artifacts.locate import local_model
from bigray.artifacts.resnet_card import load_classifier
from bigray.cluster import torch_device
from bigray.models.resnet import normalize
from bigray.serve.protocol import Delta, GenerationParams, ServeError

log = logging.getLogger(__name__)

DType = Literal["float32", "bfloat16"]


def torch_dtype(name: DType) -> torch.dtype:
    """The dtype weights are cast to at load time.

    bfloat16 suits CPUs with AMX or AVX-512 BF16 (and GPUs): ResNet-18 here runs 1.6x faster per image
    at batch 1 and 3.7x at batch 32, and agrees with the float32 weights on 99.8% of test images
    (bench/README.md). The weights are cast once: autocast would re-cast them on every call.
    """
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


# ----------------------------------------------------------------------------- GPT


@dataclass(frozen=True)
class Prompt:
    """A job with its prompt tokenized (once) and checked against the limits; ``cancelled`` is set
    when its client goes away, and the decode loop drops the row at its next step."""

    job: GenerationParams
    ids: list[int]
    cancelled: threading.Event = field(default_factory=threading.Event, compare=False)


@dataclass
class _Row:
    prompt: Prompt
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0
    done: bool = False

    @property
    def job(self) -> GenerationParams:
        return self.prompt.job


class GPTRunner:
    def __init__(
        self, model_dir: str | Path, max_prompt_tokens: int = 512, dtype: DType = "float32", use_gpu: bool = False
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.device = torch_device(use_gpu)
        # a LoRA adapter: its base with the adapter merged in (no per-token adapter cost)
        if is_adapter(self.model_dir):
            base = AutoModelForCausalLM.from_pretrained(
                str(model_files(local_model(base_of(self.model_dir))[0])), use_safetensors=True, dtype=torch.float32
            )
            model = merged(base, self.model_dir).to(torch_dtype(dtype))
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(self.model_dir), use_safetensors=True, dtype=torch_dtype(dtype)
            )
        self.model = model.to(self.device).eval()
        self.eos = self.tokenizer.eos_token_id
        ends = self.model.generation_config.eos_token_id if self.model.generation_config is not None else None
        self.stop_ids = {self.eos, *([ends] if isinstance(ends, int) else ends or [])}
        """End-of-text and the generation config's end tokens (a chat model's end-of-turn, e.g. <|im_end|>)."""
        self.max_positions = int(self.model.config.max_position_embeddings)
        self.max_prompt_tokens = max_prompt_tokens

    def encode(self, job: GenerationParams) -> Prompt:
        """Tokenize a job's prompt (a chat job's rendered messages), or raise a 400 naming the limit it breaks."""
        if job.messages is None:  # a completion's prompt is all the client's: control tokens included
            ids = self.tokenizer(job.prompt, add_special_tokens=False).input_ids
        else:
            ids = self.chat_ids([{"role": r, "content": c} for r, c in job.messages])
        n = len(ids)
        if n > self.max_prompt_tokens:
            raise ServeError(400, f"prompt has {n} tokens; this server accepts at most {self.max_prompt_tokens}")
        if n + job.max_tokens > self.max_positions:
            raise ServeError(
                400,
                f"prompt ({n} tokens) + max_tokens ({job.max_tokens}) exceeds the model's context of {self.max_positions} tokens",
            )
        return Prompt(job, ids)

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt of a chat request, rendered and tokenized as training did (artifacts.chat: no
        content makes a control token); a 400 when the model has no template or it refuses the messages."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ServeError(
                400, "this model has no chat template, so it cannot answer /v1/chat/completions; use /v1/completions"
            )
        try:
            text = chat_prompt(self.tokenizer, messages)
            return chat_tokens(self.tokenizer, text, messages, generation_prompt=True)[0]
        except ChatTemplateError as e:
            raise ServeError(400, str(e)) from None

    def _sample(self, logits: torch.Tensor, row: _Row) -> int:
        if row.job.temperature == 0:
            return int(logits.argmax())
        # shifted so the largest is 0 first: a tiny temperature then gives -inf, never inf - inf = NaN
        probs = torch.softmax((logits - logits.max()) / row.job.temperature, dim=-1)
        if row.job.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < row.job.top_p
            sorted_probs = sorted_probs * keep
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _advance(self, row: _Row, token: int) -> Delta:
        """Append a token; return the text safe to emit (held back while it may start a stop string)."""
        stops = row.job.stop
        if token in self.stop_ids:
            row.done = True
            text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
            return Delta(text[row.emitted :], "stop", len(row.tokens))
        row.tokens.append(token)
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        for s in stops:
            at = text.find(s)
            if at != -1:
                row.done = True
                return Delta(text[row.emitted : at] if at > row.emitted else "", "stop", len(row.tokens))
        if len(row.tokens) >= row.job.max_tokens:
            row.done = True
            return Delta(text[row.emitted :], "length", len(row.tokens))
        hold = max((len(s) - 1 for s in stops), default=0)
        safe = max(row.emitted, len(text) - hold)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            safe = min(safe, len(text) - 1)
        delta = Delta(text[row.emitted : safe], None, len(row.tokens))
        row.emitted = max(row.emitted, safe)
        return delta

    def sample_rows(self, logits: torch.Tensor, rows: list[_Row]) -> tuple[torch.Tensor, list[tuple[Prompt, Delta]]]:
        """Each row's next token (on the CPU, with the row's own generator) and what it emits; a row
        already done (finished, or its client went away) emits nothing. A row whose sampling fails
        is done with an error Delta, and only it: the others go on."""
        logits = logits.float().cpu()
        tokens, out = [], []
        for i, row in enumerate(rows):
            token = self.eos
            if row.done:  # finished or cancelled, its slot not yet reclaimed (DecodeBatch compacts lazily)
                pass
            else:
                try:
                    token = self._sample(logits[i], row)
                    out.append((row.prompt, self._advance(row, token)))
                except Exception as e:  # bad numbers, a tokenizer error
                    log.exception("generation failed for one prompt of a batch of %d", len(rows))
                    row.done, token = True, self.eos
                    out.append(
                        (
                            row.prompt,
                            Delta("", "error", len(row.tokens), error=f"generation failed: {type(e).__name__}"),
                        )
                    )
            tokens.append(token)
        return torch.tensor(tokens, device=self.device), out

    def generate(self, batch: list[Prompt]) -> Iterator[list[Delta | None]]:
        """Request-level batching: decode these prompts together, to the end of the longest; each step
        yields one Delta per prompt (None once it is finished). The Serve deployment uses
        :class:`DecodeBatch` directly, admitting new prompts at every step."""
        decode = DecodeBatch(self)
        index = {id(p): i for i, p in enumerate(batch)}
        produced = decode.add(batch)
        while True:
            step: list[Delta | None] = [None] * len(batch)
            for prompt, delta in produced:
                step[index[id(prompt)]] = delta
            yield step
            if not decode:
                return
            produced = decode.step()


class DecodeBatch:
    """Continuous (iteration-level) batching on one model, as vLLM and TGI do it.

    Prompts join at any step: they are prefilled together (left-padded to their longest) and their
    KV cache is left-padded to the batch's length and appended, so no prompt already in the batch
    is recomputed. Every :meth:`step` decodes one token for every row; a row that finishes (end of
    text, stop string, max_tokens, error) or whose client went away leaves at once, with its cache
    rows, and cache columns that no remaining row attends to are cut. Padding never takes a
    position: each row has its own position ids, so its text is what it would be decoded alone
    (up to float rounding in batched matmuls).
    """

    def __init__(self, runner: GPTRunner):
        self.runner = runner
        self.rows: list[_Row] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None
        """[rows, cache length]: 1 where a row has a token, 0 for its left padding."""
        self.positions: torch.Tensor | None = None
        """[rows]: the position id of each row's next token."""
        self.last: torch.Tensor | None = None
        """[rows]: each row's last sampled token, the next step's input."""
        self.cancelled = 0
        """Rows that left because their client went away (each counted once, when it leaves)."""

    def __len__(self) -> int:
        """Rows still decoding."""
        return sum(not row.done for row in self.rows)

    @torch.no_grad()
    def add(self, prompts: list[Prompt]) -> list[tuple[Prompt, Delta]]:
        """Prefill ``prompts`` and join them to the batch; returns their first tokens' Deltas."""
        r = self.runner
        rows = [_Row(p, _generator(p.job.seed)) for p in prompts]
        self._leave_if_cancelled(rows)
        width = max(len(p.ids) for p in prompts)
        ids = torch.tensor([[r.eos] * (width - len(p.ids)) + p.ids for p in prompts], device=r.device)
        mask = torch.tensor([[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in prompts], device=r.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = r.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        tokens, produced = r.sample_rows(out.logits[:, -1, :], rows)
        self._compact(finished=1)  # one copy of the cache for the rows that left, then one to join
        self._join(rows, out.cache, mask, positions[:, -1] + 1, tokens)
        self._compact(finished=1)
        return produced

    @torch.no_grad()
    def step(self) -> list[tuple[Prompt, Delta]]:
        """One token for every row; returns the Deltas of the rows that produced one."""
        r = self.runner
        self._leave_if_cancelled(self.rows)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        out = r.model(
            input_ids=self.last.view(-1, 1),
            attention_mask=self.mask,
            position_ids=self.positions.view(-1, 1),
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache, self.positions = out.cache, self.positions + 1
        self.last, produced = r.sample_rows(out.logits[:, -1, :], self.rows)
        self._compact(finished=max(1, len(self.rows) // 4))
        return produced

    def _leave_if_cancelled(self, rows: list[_Row]) -> None:
        """Rows whose client went away are done before this step samples them, and counted here:
        the one place a cancellation is seen, so none is missed when it arrives mid-step."""
        for row in rows:
            if not row.done and row.prompt.cancelled.is_set():
                row.done = True
                self.cancelled += 1

    def _join(
        self, rows: list[_Row], cache: Any, mask: torch.Tensor, positions: torch.Tensor, last: torch.Tensor
    ) -> None:
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions, self.last = rows, cache, mask, positions, last
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(mask, width)])
        self.positions = torch.cat([self.positions, positions])
        self.last = torch.cat([self.last, last])
        self.rows += rows

    def _compact(self, finished: int) -> None:
        """Drop the finished rows (and their cache rows) once there are ``finished`` of them: each
        drop copies the whole cache, so rows that finish one by one are dropped a few at a time
        (until then they are decoded and ignored)."""
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if not keep:
            self.rows, self.cache, self.mask, self.positions, self.last = [], None, None, None, None
            return
        if len(self.rows) - len(keep) >= finished:
            index = torch.tensor(keep, device=self.mask.device)
            self.cache.batch_select_indices(index)
            self.mask, self.positions, self.last = self.mask[index], self.positions[index], self.last[index]
            self.rows = [self.rows[i] for i in keep]
        unused = int((self.mask.sum(0) > 0).int().argmax())  # leading columns no row attends to
        if unused:
            self.mask = self.mask[:, unused:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., unused:, :], layer.values[..., unused:, :]


def joinable(decoding: int, capacity: int, waiting: int) -> int:
    """How many waiting prompts join a decode batch now. Each join is a prefill pass and a copy of
    the batch's cache, so a nearly full batch takes arrivals in groups (once an eighth of its
    capacity is free) rather than one by one; a batch with room takes them at once."""
    free = capacity - decoding
    if decoding and free < max(1, capacity // 8):
        return 0
    return min(waiting, free)


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros before the time dimension of a mask [rows, T] or a KV tensor [rows, heads, T, dim], up to ``width``."""
    dim = 1 if x.dim() == 2 else -2
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _generator(seed: int | None) -> torch.Generator:
    """A request's own random stream: its seed, or a fresh random one."""
    return torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ())))


# ----------------------------------------------------------------------------- ResNet


class ClassifierRunner:
    def __init__(
        self, model_dir: str | Path, max_image_pixels: int = 16_000_000, dtype: DType = "float32", use_gpu: bool = False
    ):
        """``model_dir``: a local ResNet checkpoint or its model/ directory (Serve passes its checked copy)."""
        model, card = load_classifier(model_dir)
        # channels_last: what oneDNN's convolutions want (no cost in float32, 1.4x faster in bfloat16 here)
        self.dtype, self.device = torch_dtype(dtype), torch_device(use_gpu)
        self.model = model.to(device=self.device, dtype=self.dtype, memory_format=torch.channels_last)
        self.info = card["data"]
        self.arch = card["arch"]
        self.max_image_pixels = max_image_pixels

    @property
    def class_names(self) -> list[str]:
        return list(self.info["class_names"])

    def preprocess(self, data: bytes) -> torch.Tensor:
        """Decode a JPEG/PNG and turn it into the uint8 CHW tensor training used (same size, channels)."""
        from PIL import Image, UnidentifiedImageError

        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise ServeError(413, f"image refused: {e}", "payload_too_large") from None
        except (
            UnidentifiedImageError,
            OSError,
            ValueError,
            SyntaxError,
        ) as e:  # ValueError: PIL's "Decompressed data too large" (text/ICC chunks)
            reason = f": {e}" if isinstance(e, ValueError) else ""
            raise ServeError(400, f"the body is not a decodable image (send a JPEG or PNG){reason}") from None
        if im.format not in ("JPEG", "PNG"):
            raise ServeError(415, f"unsupported image format {im.format}; send a JPEG or PNG", "unsupported_media_type")
        w, h = im.size
        if w * h > self.max_image_pixels:
            raise ServeError(
                413,
                f"image is {w}x{h} = {w * h} pixels; this server accepts at most {self.max_image_pixels}",
                "payload_too_large",
            )
        try:
            im.load()
        except Image.DecompressionBombError as e:
            raise ServeError(413, f"image refused: {e}", "payload_too_large") from None
        except Exception:
            raise ServeError(400, "the image data is truncated or corrupt") from None
        channels, size = self.info["channels"], self.info["image_size"]
        im = im.convert("L" if channels == 1 else "RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        arr = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        return arr.view(size, size, channels).permute(2, 0, 1).contiguous()

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Probabilities for a uint8 NCHW batch, normalised as in training."""
        x = normalize(images.to(self.device), self.info["mean"], self.info["std"]).to(self.dtype)
        return self.model(x).float().softmax(-1).cpu()

    def describe(self) -> dict:
        return {"arch": self.arch, "classes": self.class_names}


__all__ = ["ClassifierRunner", "DecodeBatch", "GPTRunner", "Prompt", "joinable", "torch_dtype"]
