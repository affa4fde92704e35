"""Tokenizing a corpus larger than memory with Ray Data.

Each input file (plain text, JSONL or parquet with a ``text`` field; local paths or URIs) is one
task: a pool of tokenizer actors (``map_batches``, one CPU each, anywhere on the cluster) reads it,
splits it into train/val text exactly as the single-process path does, and encodes it. The driver
consumes the results in input order (``preserve_order``) and appends them to fixed-size token
shards. Memory is bounded by the file and shard sizes, not by the corpus; the shards and the
manifest depend only on the inputs, never on how many actors ran (so 1 or 20 workers give
byte-identical output).
"""

from __future__ import annotations

import logging
import resource
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from bigray.data.cache import DataError
from bigray.data.documents import encode_documents, file_splits, load_tokenizer

log = logging.getLogger(__name__)


class EncodeFiles:
    """A Ray Data actor: loads the tokenizer once, then encodes one file per call."""

    def __init__(self, tokenizer_dir: str, val_fraction: float, dtype: str):
        self.tok = load_tokenizer(tokenizer_dir)
        self.val_fraction, self.dtype = val_fraction, np.dtype(dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {
            "index": [],
            "train": [],
            "val": [],
            "train_chars": [],
            "val_chars": [],
            "peak_rss_kb": [],
        }
        for index, path in zip(batch["index"], batch["path"]):
            train, val = file_splits(str(path), self.val_fraction)
            out["index"].append(int(index))
            out["train_chars"].append(sum(map(len, train)))
            out["val_chars"].append(sum(map(len, val)))
            out["train"].append(encode_documents(self.tok, train).astype(self.dtype).tobytes())
            out["val"].append(encode_documents(self.tok, val).astype(self.dtype).tobytes())
            out["peak_rss_kb"].append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return {k: np.asarray(v, dtype=object if k in ("train", "val") else np.int64) for k, v in out.items()}


class ShardWriter:
    """Appends token ids to ``<split>-00000.bin, -00001.bin, ...`` of exactly ``shard_tokens`` ids each
    (the last one shorter)."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[str] = []
        self.total = 0
        self._file: Any = None
        self._in_shard = 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._file is None or self._in_shard == self.shard_tokens:
                self._next()
            take = min(len(ids), self.shard_tokens - self._in_shard)
            self._file.write(ids[:take].astype(self.dtype, copy=False).tobytes())
            self._in_shard += take
            self.total += take
            ids = ids[take:]

    def _next(self) -> None:
        if self._file is not None:
            self._file.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.shards.append(name)
        self._file = open(self.directory / name, "wb")
        self._in_shard = 0

    def close(self) -> list[str]:
        if self._file is not None:
            self._file.close()
        return self.shards


def encoded_files(
    files: list[str], tokenizer_dir: Path, val_fraction: float, dtype: np.dtype, workers: int
) -> Iterator[dict[str, Any]]:
    """Every file's encoded (train, val) ids, in input order, from ``workers`` Ray Data actors."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # output order = input order, whatever finishes first
    ds = ray.data.from_items([{"index": i, "path": p} for i, p in enumerate(files)], override_num_blocks=len(files))
    ds = ds.map_batches(
        EncodeFiles,
        fn_constructor_kwargs={"tokenizer_dir": str(tokenizer_dir), "val_fraction": val_fraction, "dtype": dtype.name},
        batch_size=1,
        concurrency=workers,
        num_cpus=1,
    )
    expected = 0
    for row in ds.iter_rows():
        if row["index"] != expected:  # never happens with preserve_order; checked because the output depends on it
            raise DataError(f"tokenizing out of order: got file {row['index']}, expected {expected}")
        expected += 1
        yield row


def tokenize_with_ray_data(
    files: list[str],
    tokenizer_dir: Path,
    out: Path,
    val_fraction: float,
    dtype: np.dtype,
    shard_tokens: int,
    workers: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Encode ``files`` into token shards under ``out``.

    Returns (manifest fields, which depend only on the inputs; run statistics, which do not belong
    in the manifest: worker count and the tokenizer actors' peak RSS).
    """
    from bigray.cluster import ensure_ray

    started = ensure_ray()
    writers = {split: ShardWriter(out, split, dtype, shard_tokens) for split in ("train", "val")}
    peak_rss_kb = 0
    chars = {"train": 0, "val": 0}
    try:
        for row in encoded_files(files, tokenizer_dir, val_fraction, dtype, workers):
            for split, writer in writers.items():
                writer.write(np.frombuffer(row[split], dtype=dtype))
                chars[split] += int(row[f"{split}_chars"])
            peak_rss_kb = max(peak_rss_kb, int(row["peak_rss_kb"]))
    finally:
        shards = {split: w.close() for split, w in writers.items()}
        if started:
            import ray

            ray.shutdown()
    log.info(
        "tokenized %d files with %d Ray Data workers (peak worker RSS %.0f MB)", len(files), workers, peak_rss_kb / 1024
    )
    fields = {
        "shards": shards,
        "shard_tokens": shard_tokens,
        "tokens": {s: w.total for s, w in writers.items()},
        "chars": chars,
    }
    return fields, {"workers": workers, "worker_peak_rss_mb": round(peak_rss_kb / 1024, 1)}
