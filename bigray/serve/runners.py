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
from typing import Iterator, Literal

import torch

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
    job: GenerationParams
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0
    done: bool = False


class GPTRunner:
    def __init__(self, model_dir: str | Path, max_prompt_tokens: int = 512, dtype: DType = "float32", use_gpu: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.device = torch_device(use_gpu)
        model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), use_safetensors=True, dtype=torch_dtype(dtype))
        self.model = model.to(self.device).eval()
        self.eos = self.tokenizer.eos_token_id
        self.max_positions = int(self.model.config.n_positions)
        self.max_prompt_tokens = max_prompt_tokens

    def encode(self, job: GenerationParams) -> Prompt:
        """Tokenize a job's prompt, or raise a 400 naming the limit it breaks."""
        ids = self.tokenizer(job.prompt, add_special_tokens=False).input_ids
        n = len(ids)
        if n > self.max_prompt_tokens:
            raise ServeError(400, f"prompt has {n} tokens; this server accepts at most {self.max_prompt_tokens}")
        if n + job.max_tokens > self.max_positions:
            raise ServeError(400, f"prompt ({n} tokens) + max_tokens ({job.max_tokens}) exceeds the model's context of {self.max_positions} tokens")
        return Prompt(job, ids)

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
        if token == self.eos:
            row.done = True
            text = self.tokenizer.decode(row.tokens)
            return Delta(text[row.emitted :], "stop", len(row.tokens))
        row.tokens.append(token)
        text = self.tokenizer.decode(row.tokens)
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

    @torch.no_grad()
    def generate(self, batch: list[Prompt]) -> Iterator[list[Delta | None]]:
        """Decode all prompts together; each step yields one Delta per prompt (None once it is finished)."""
        rows = [_Row(p.job, _generator(p.job.seed)) for p in batch]
        prompts = [p.ids for p in batch]
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self.eos] * (width - len(p)) + p for p in prompts], device=self.device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        cache = None
        while True:
            out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
            cache = out.cache
            logits = out.logits[:, -1, :].float().cpu()  # sampled on the CPU with each request's generator
            step: list[Delta | None] = []
            next_tokens = []
            for i, (row, prompt) in enumerate(zip(rows, batch)):
                if row.done or prompt.cancelled.is_set():
                    row.done = True
                    step.append(None)
                    next_tokens.append(self.eos)
                    continue
                try:
                    token = self._sample(logits[i], row)
                    step.append(self._advance(row, token))
                except Exception as e:  # this row alone fails (bad numbers, a tokenizer error); the batch goes on
                    log.exception("generation failed for one prompt of a batch of %d", len(rows))
                    row.done, token = True, self.eos
                    step.append(Delta("", "error", len(row.tokens), error=f"generation failed: {type(e).__name__}"))
                next_tokens.append(token)
            yield step
            if all(r.done for r in rows):
                return
            input_ids = torch.tensor(next_tokens, device=self.device).view(-1, 1)
            attention = torch.cat([attention, attention.new_ones(len(rows), 1)], dim=1)
            positions = positions[:, -1:] + 1


def _generator(seed: int | None) -> torch.Generator:
    """A request's own random stream: its seed, or a fresh random one."""
    return torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ())))


# ----------------------------------------------------------------------------- ResNet


class ClassifierRunner:
    def __init__(self, model_dir: str | Path, max_image_pixels: int = 16_000_000, dtype: DType = "float32", use_gpu: bool = False):
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
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:  # ValueError: PIL's "Decompressed data too large" (text/ICC chunks)
            reason = f": {e}" if isinstance(e, ValueError) else ""
            raise ServeError(400, f"the body is not a decodable image (send a JPEG or PNG){reason}") from None
        if im.format not in ("JPEG", "PNG"):
            raise ServeError(415, f"unsupported image format {im.format}; send a JPEG or PNG", "unsupported_media_type")
        w, h = im.size
        if w * h > self.max_image_pixels:
            raise ServeError(413, f"image is {w}x{h} = {w * h} pixels; this server accepts at most {self.max_image_pixels}", "payload_too_large")
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


__all__ = ["ClassifierRunner", "GPTRunner", "Prompt", "torch_dtype"]
