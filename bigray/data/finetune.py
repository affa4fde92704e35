"""Fine-tuning data: text files, prompt/completion JSONL or chat JSONL, tokenized with the base
model's tokenizer.

The result is the same kind of cache as pretraining's (``train.bin``/``val.bin`` token streams and
the tokenizer, under ``<cache_dir>/finetune/<key>/``), so the same window reader and training loop
use it. JSONL examples are packed one after another, each ending in the end-of-text token, with a
parallel ``<split>.mask`` that is 0 on prompt tokens: only completion tokens (and the end-of-text
that closes them) are learned; ``<split>.starts`` is 1 on each example's first token, so that
training can keep packed examples from attending to each other. Chat rows are rendered with the chat template and only the assistant
turns (with the end-of-turn tokens the template puts after them) are learned.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from bigray.artifacts.chat import CHAT_ROLES, MAX_MESSAGES, ChatTemplateError, encode_chat
from bigray.artifacts.storage import StorageError, absolute, cached_file, join
from bigray.config import FinetuneDataConfig
from bigray.data.cache import DataError, build_cache_dir, sha256_file
from bigray.data.documents import clean_text, encode_documents, load_tokenizer, split_documents, token_dtype
from bigray.data.text import TextDataset, prepared

log = logging.getLogger(__name__)


MAX_LINE_CHARS = 4 << 20
"""Longest JSONL row read (4 Mi characters): a longer one is refused before it is held in memory whole."""


def _json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    """Each non-blank line's JSON value with where it is ("file line N"); a line that is not JSON, or
    longer than MAX_LINE_CHARS, is an error naming it."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(iter(lambda: f.readline(MAX_LINE_CHARS + 1), ""), start=1):
            where = f"{path.name} line {number}"
            if len(line) > MAX_LINE_CHARS:
                raise DataError(f"{where}: longer than {MAX_LINE_CHARS:,} characters; split the row or the text")
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except ValueError as e:
                raise DataError(f"{where}: not valid JSON ({e})") from None


def read_jsonl(path: Path) -> list[tuple[str, str]]:
    """(prompt, completion) rows; blank lines are skipped, anything else wrong names its line."""
    rows = []
    for where, row in _json_lines(path):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object with 'prompt' and 'completion', got {type(row).__name__}")
        for key in ("prompt", "completion"):
            if key not in row:
                raise DataError(f"{where}: missing field '{key}'")
            if not isinstance(row[key], str):
                raise DataError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__}")
        if not row["completion"]:
            raise DataError(f"{where}: 'completion' is empty")
        rows.append((row["prompt"], row["completion"]))
    return rows


def read_chat_jsonl(path: Path) -> list[list[dict[str, str]]]:
    """Conversations of ``{"messages": [{"role", "content"}, ...]}`` rows; anything wrong names its line."""
    conversations = []
    for where, row in _json_lines(path):
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: expected a JSON object with a non-empty 'messages' list")
        if len(messages) > MAX_MESSAGES:
            raise DataError(f"{where}: {len(messages)} messages; a conversation holds at most {MAX_MESSAGES}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: message {i} must be an object with a string 'content'")
            if m.get("role") not in CHAT_ROLES:
                raise DataError(f"{where}: message {i} has role {m.get('role')!r}; allowed: {', '.join(CHAT_ROLES)}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant turn, so nothing to learn from")
        conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])
    return conversations


def chat_template(tok: Any, configured: str) -> str:
    """The template chat rows are rendered with: the configured one (inline, or a file), else the tokenizer's."""
    if configured:
        path = Path(configured)
        return path.read_text(encoding="utf-8") if "{" not in configured and path.is_file() else configured
    if not getattr(tok, "chat_template", None):
        raise DataError("the base model's tokenizer has no chat template: give one in data.chat_template")
    return tok.chat_template


def encode_chats(
    tok: Any, conversations: list[list[dict[str, str]]], template: str
) -> tuple[list[int], list[int], list[int]]:
    """Packed token ids, the loss mask (1 on the tokens that start inside an assistant turn's span;
    the whole rendered text is tokenized at once, so ids are what serving sees) and each
    conversation's first index. A conversation the template does not close with the end-of-text
    token gets one, learned when the conversation ends on an assistant turn."""
    ids: list[int] = []
    mask: list[int] = []
    starts: list[int] = []
    for number, messages in enumerate(conversations, start=1):
        starts.append(len(ids))
        try:
            text, conversation, offsets, spans = encode_chat(tok, messages, template)
        except ChatTemplateError as e:
            raise DataError(f"conversation {number}: {e}") from None
        ids += conversation
        mask += [int(any(a <= start < b for a, b in spans)) for start, _ in offsets]
        if not text.rstrip().endswith(tok.eos_token):
            ids.append(tok.eos_token_id)
            mask.append(int(messages[-1]["role"] == "assistant"))
    return ids, mask, starts


def encode_examples(tok: Any, rows: list[tuple[str, str]]) -> tuple[list[int], list[int], list[int]]:
    """Packed token ids, the loss mask (0 on prompt tokens, 1 on completion + end-of-text) and each
    example's first index."""
    ids: list[int] = []
    mask: list[int] = []
    starts: list[int] = []
    prompts = tok([p for p, _ in rows], add_special_tokens=False)["input_ids"]
    completions = tok([c for _, c in rows], add_special_tokens=False)["input_ids"]
    for p, c in zip(prompts, completions):
        starts.append(len(ids))
        ids += p + c + [tok.eos_token_id]
        mask += [0] * len(p) + [1] * (len(c) + 1)
    return ids, mask, starts


def _check_files(files: list[str], key: str) -> list[Path]:
    """Local paths of the data files (a file in storage is copied to this node once; only the driver reads them)."""
    paths = []
    for f in files:
        try:
            paths.append(cached_file(f))
        except StorageError as e:
            raise DataError(f"data.{key}: {e}") from None
        if not paths[-1].is_file():
            raise DataError(f"data.{key}: {f} does not exist")
    return paths


def _split_rows(cfg: FinetuneDataConfig, train_paths: list[Path], val_paths: list[Path]) -> dict[str, list[Any]]:
    read_jsonl_rows = read_chat_jsonl if cfg.format == "chat" else read_jsonl
    train = [row for p in train_paths for row in read_jsonl_rows(p)]
    if not train:
        raise DataError(f"the fine-tuning dataset is empty: no examples in {', '.join(map(str, train_paths))}")
    if val_paths:
        val = [row for p in val_paths for row in read_jsonl_rows(p)]
    else:
        if len(train) < 2:
            raise DataError("need at least 2 examples to hold some out for validation (or give data.val_files)")
        n_val = max(1, round(len(train) * cfg.val_fraction))
        train, val = train[:-n_val], train[-n_val:]
    if not val:
        raise DataError(f"the validation set is empty: no examples in {', '.join(map(str, val_paths))}")
    return {"train": train, "val": val}


def _split_text(cfg: FinetuneDataConfig, train_paths: list[Path], val_paths: list[Path]) -> dict[str, list[str]]:
    def docs(paths: list[Path]) -> list[tuple[str, str]]:
        out = [(p.name, clean_text(p.read_text(encoding="utf-8", errors="replace"))) for p in paths]
        return [(n, t) for n, t in out if t.strip()]

    train_docs = docs(train_paths)
    if not train_docs:
        raise DataError(f"the fine-tuning dataset is empty: no text in {', '.join(map(str, train_paths))}")
    if val_paths:
        train, val = [t for _, t in train_docs], [t for _, t in docs(val_paths)]
    else:
        train, val = split_documents(train_docs, cfg.val_fraction)
    if not val:
        raise DataError("the validation text is empty: use more text, a larger data.val_fraction or data.val_files")
    return {"train": train, "val": val}


def prepare_finetune_data(cfg: FinetuneDataConfig, tokenizer_dir: str | Path) -> TextDataset:
    """Tokenize (or reuse) the fine-tuning data with the tokenizer in ``tokenizer_dir``."""
    train_paths = _check_files(cfg.train_files, "train_files")
    val_paths = _check_files(cfg.val_files, "val_files")
    tok = load_tokenizer(tokenizer_dir)
    if tok.eos_token_id is None:
        raise DataError(f"the tokenizer in {tokenizer_dir} has no end-of-text (eos) token")
    template = ""
    if cfg.format == "chat":
        template = tok.chat_template = chat_template(tok, cfg.chat_template)  # saved with the data, so with the model
    settings = {
        "layout": 2,  # 2: examples' first tokens recorded (<split>.starts)
        "chat_template": template,
        "format": cfg.format,
        "val_fraction": cfg.val_fraction,
        "train": [sha256_file(p) for p in train_paths],
        "val": [sha256_file(p) for p in val_paths],
        "tokenizer": hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest(),
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    location = join(cfg.cache_dir, "finetune", f"{cfg.format}-{key}")

    def build(tmp: Path) -> dict[str, Any]:
        tok.save_pretrained(str(tmp / "tokenizer"))
        dtype = token_dtype(len(tok))
        counts, examples = {}, {}
        if cfg.format in ("jsonl", "chat"):
            for split, rows in _split_rows(cfg, train_paths, val_paths).items():
                ids, mask, starts = (
                    encode_chats(tok, rows, template) if cfg.format == "chat" else encode_examples(tok, rows)
                )
                np.asarray(mask, dtype=np.uint8).tofile(tmp / f"{split}.mask")
                first = np.zeros(len(ids), dtype=np.uint8)
                first[starts] = 1
                first.tofile(tmp / f"{split}.starts")
                np.asarray(ids, dtype=dtype).tofile(tmp / f"{split}.bin")
                counts[split], examples[split] = len(ids), len(rows)
        else:
            for split, texts in _split_text(cfg, train_paths, val_paths).items():
                ids = encode_documents(tok, texts)
                np.asarray(ids, dtype=dtype).tofile(tmp / f"{split}.bin")
                counts[split], examples[split] = len(ids), len(texts)
        return {
            "source": [str(p) for p in train_paths + val_paths],
            "format": cfg.format,
            "examples": examples,
            "tokens": counts,
            "masked": cfg.format in ("jsonl", "chat"),
            "example_starts": cfg.format in ("jsonl", "chat"),
            "tokenizer_sha256": sha256_file(tmp / "tokenizer" / "tokenizer.json"),
            "vocab_size": len(tok),
            "dtype": dtype.name,
        }

    manifest, built = build_cache_dir(location, build)
    if built:
        log.info("tokenized fine-tuning data into %s: %s", location, manifest["tokens"])
    return prepared(location, manifest)


def with_absolute_paths(cfg: FinetuneDataConfig) -> FinetuneDataConfig:
    """Pin paths on the driver: Ray Train workers run in their own cwd."""
    import dataclasses

    return dataclasses.replace(
        cfg,
        cache_dir=absolute(cfg.cache_dir),
        train_files=[absolute(f) for f in cfg.train_files],
        val_files=[absolute(f) for f in cfg.val_files],
    )
