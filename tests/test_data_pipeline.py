"""Tokenizing a multi-file corpus with Ray Data (text, JSONL and parquet inputs) on the session's Ray:
deterministic shards whatever the worker count, the same tokens as the single-process path, windows
read across shards, a damaged shard refused by name."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from bigray.config import TextDataConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(downloads_dir, tmp_path_factory):
    """Eight of Shakespeare's works as files: six plain text, one JSONL and one parquet (a paragraph per row)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bigray.data.text import load_documents

    root = tmp_path_factory.mktemp("corpus")
    (root / "cache" / "downloads").parent.mkdir()
    (root / "cache" / "downloads").symlink_to(downloads_dir)
    docs = load_documents(TextDataConfig(cache_dir=str(root / "cache")))[:8]
    texts = []
    for name, text in docs[:6]:
        texts.append(root / f"{name}.txt")
        texts[-1].write_text(text[:120_000])
    paragraphs = [[p for p in text[:120_000].split("\n\n") if p.strip()] for _, text in docs[6:8]]
    (root / "rows.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs[0]))
    pq.write_table(pa.table({"text": paragraphs[1]}), root / "rows.parquet")
    return [str(p) for p in texts], [str(root / "rows.jsonl"), str(root / "rows.parquet")]


def _cfg(cache, files, workers):
    return TextDataConfig(
        cache_dir=str(cache),
        source="files",
        text_files=files,
        vocab_size=512,
        tokenize_workers=workers,
        shard_tokens=20_000,
    )


def _digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_ray_data_shards_are_identical_for_any_worker_count(ray_cluster, corpus, tmp_path):
    from bigray.data.text import TokenWindows, prepare_text

    texts, rows = corpus
    one, _ = prepare_text(_cfg(tmp_path / "one", texts + rows, 1))
    two, _ = prepare_text(_cfg(tmp_path / "two", texts + rows, 2))
    assert one.directory.name == two.directory.name  # the same cache key: the worker count is not an input
    assert _digest(one.directory) == _digest(two.directory)  # byte-identical shards, tokenizer and manifest
    shards = one.manifest["shards"]["train"]
    assert len(shards) >= 3 and one.manifest["tokens"]["train"] == len(one.tokens("train"))
    assert all((one.directory / s).stat().st_size == 20_000 * 2 for s in shards[:-1])  # fixed-size uint16 shards

    # windows read across shard boundaries are those of the one long array
    whole = np.concatenate([np.fromfile(one.directory / s, dtype=np.uint16) for s in shards])
    sharded, flat = TokenWindows(one.tokens("train"), 63), TokenWindows(whole, 63)
    ids = sharded.window_ids(seed=3, index=5, rank=1, world_size=2, batch=16, shuffle=True)
    assert np.array_equal(sharded.batch(ids)[0], flat.batch(ids)[0]) and sharded.num_windows == flat.num_windows


def test_ray_data_gives_the_single_process_tokens(ray_cluster, corpus, tmp_path):
    from bigray.data.text import prepare_text

    texts, _ = corpus
    process, _ = prepare_text(
        TextDataConfig(cache_dir=str(tmp_path / "p"), source="files", text_files=texts, vocab_size=512)
    )
    pipeline, _ = prepare_text(_cfg(tmp_path / "r", texts, 2))
    for split in ("train", "val"):
        assert np.array_equal(np.asarray(process.tokens(split)), np.asarray(pipeline.tokens(split))), split


def test_damaged_shard_is_refused_by_name(ray_cluster, corpus, tmp_path):
    from bigray.data.cache import DataError
    from bigray.data.text import open_prepared, prepare_text

    texts, rows = corpus
    data, _ = prepare_text(_cfg(tmp_path / "c", texts + rows, 2))
    shard = data.directory / "train-00001.bin"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"train-00001\.bin does not match its checksum"):
        open_prepared(data.directory)
