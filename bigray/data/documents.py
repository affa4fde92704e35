"""Raw text to documents and token ids, the same way everywhere: cleaning, the train/val split
rule, encoding. Shared by the single-process path (text.py, finetune.py) and the Ray Data
pipeline (pipeline.py), which is why both give the same tokens.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from bigray.artifacts.storage import name_of, read_bytes
from bigray.data.cache import DataError

EOS = "<|endoftext|>"

_BOILERPLATE = [
    re.compile(r"\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*?\*\*\*", re.I | re.S),
    re.compile(r"\*END\*THE SMALL PRINT!.*?\*END\*", re.I | re.S),
]
_FOOTER = re.compile(r"(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*", re.I | re.S)


def clean_text(text: str) -> str:
    """Drop Project Gutenberg licence header/footer and normalise whitespace."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    for pat in _BOILERPLATE:
        m = pat.search(text)
        if m:
            text = text[m.end() :]
    text = _FOOTER.sub("", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def split_documents(docs: list[tuple[str, str]], val_fraction: float) -> tuple[list[str], list[str]]:
    """The last ``val_fraction`` of every document (cut at a line break) goes to validation."""
    train, val = [], []
    for _, text in docs:
        cut = int(len(text) * (1 - val_fraction))
        nl = text.find("\n", cut)
        cut = nl + 1 if nl != -1 else cut
        train.append(text[:cut])
        if text[cut:].strip():
            val.append(text[cut:])
    return train, val


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 65536 else np.uint32)


CHUNK_CHARS = 1 << 16


def _lone(text: str, char: str, start: int, end: int) -> int:
    """The first ``char`` in ``text[start:end]`` with non-space characters on both sides, else -1."""
    cut = text.find(char, start, end)
    while cut != -1 and (cut + 1 >= len(text) or text[cut - 1].isspace() or text[cut + 1].isspace()):
        cut = text.find(char, cut + 1, end)
    return cut


def chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """``text`` cut into pieces of ``size`` to ``16 * size`` characters: right after a lone line break,
    else right before a lone space, else (a text with no such place: hostile or binary) at
    ``16 * size``. Byte-level BPE's pre-tokenizer starts a pre-token at such a newline and at such a
    space either way, so encoding the pieces gives the same ids as encoding the whole text, while
    the tokenizer can encode pieces in parallel and never holds one huge string or encoding."""
    out, start = [], 0
    while len(text) - start > size:
        window = (start + size, min(len(text), start + 16 * size))
        cut = _lone(text, "\n", *window) + 1 or _lone(text, " ", *window)
        if cut == -1:
            cut = window[1] if window[1] < len(text) else -1
        if cut <= start or cut >= len(text):
            break
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def encode_documents(tok: Any, texts: list[str], batch_chunks: int = 64) -> np.ndarray:
    """Token ids of every text, each followed by the tokenizer's end-of-text token (int64).

    Texts are encoded in pieces (:func:`chunks`), ``batch_chunks`` at a time, straight into numpy:
    memory stays near 8 bytes per token instead of a Python list's ~36.
    """
    if tok.eos_token_id is None:
        raise DataError("the tokenizer has no end-of-text (eos) token")
    eos = np.array([tok.eos_token_id], dtype=np.int64)
    pieces, pending, ends = [], [], []  # ends: indices in pending after which a text ends
    for text in texts:
        pending += chunks(text)
        ends.append(len(pending) - 1)
        if len(pending) >= batch_chunks:
            _encode_into(tok, pending, set(ends), eos, pieces)
            pending, ends = [], []
    if pending:
        _encode_into(tok, pending, set(ends), eos, pieces)
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def _encode_into(tok: Any, batch: list[str], ends: set[int], eos: np.ndarray, out: list[np.ndarray]) -> None:
    ids = tok(batch, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    for i, piece in enumerate(ids):
        out.append(np.asarray(piece, dtype=np.int64))
        if i in ends:
            out.append(eos)


def file_splits(path: str, val_fraction: float) -> tuple[list[str], list[str]]:
    """(train texts, val texts) of one input file.

    A text file is one document whose last ``val_fraction`` goes to validation (the rule of
    ``split_documents``); in JSONL and parquet every row's ``text`` is a document and the last
    ``val_fraction`` of the rows are held out.
    """
    data = read_bytes(path)
    name = name_of(path)
    if not name.endswith((".jsonl", ".parquet")):
        return split_documents([(name, clean_text(data.decode("utf-8", errors="replace")))], val_fraction)
    if name.endswith(".jsonl"):
        rows = []
        for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line)["text"])
                except (ValueError, KeyError, TypeError) as e:
                    raise DataError(f"{path} line {n}: expected a JSON object with a 'text' string ({e})") from None
    else:
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(io.BytesIO(data), columns=["text"]).column("text").to_pylist()
        except Exception as e:  # not parquet, or no text column
            raise DataError(f"{path}: expected a parquet file with a 'text' column ({e})") from None
    texts = [clean_text(str(r)) for r in rows if r and str(r).strip()]
    n_val = max(1, round(len(texts) * val_fraction)) if len(texts) > 1 else 0
    return texts[: len(texts) - n_val], texts[len(texts) - n_val :]
