"""Finding the checkpoint a user means: a checkpoint directory, a run directory (its newest complete
checkpoint), a ``summary.json`` (the checkpoint it records), or an exported model directory; each a
local path or a storage URI.

:func:`resolve_checkpoint` only finds (nothing is copied); :func:`local_checkpoint` and
:func:`served_model` also check it with the one completeness check (checkpoint.read_meta) and copy
down, once per node, what the caller will load.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigray.artifacts.adapter import ADAPTER_CONFIG
from bigray.artifacts.checkpoint import META, CheckpointError, latest_complete, read_meta
from bigray.artifacts.storage import absolute, cached_copy, drop_copy, exists, is_dir, is_uri, join, kind_of, name_of, parent, read_text

log = logging.getLogger(__name__)

MODEL_PARTS = (META, "ranks", "model")
"""What a served model needs from a checkpoint: its metadata, the markers and ``model/`` (no ZeRO shards)."""


def is_export(location: str) -> bool:
    """An exported Hugging Face / model directory (weights + config, or a LoRA adapter; no bigray.json)."""
    return (exists(join(location, "config.json")) or exists(join(location, ADAPTER_CONFIG))) and not exists(join(location, META))


def _from_summary(summary: str) -> str:
    """The checkpoint a summary.json records; if retention deleted it (or it is incomplete), the run's
    newest complete checkpoint instead."""
    try:
        recorded = json.loads(read_text(summary)).get("checkpoint")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{summary} is not a readable bigray summary: {e}") from None
    if not recorded or not isinstance(recorded, str):
        raise CheckpointError(f"{summary} records no checkpoint")
    if is_export(recorded):
        return recorded
    try:
        read_meta(recorded)
        return recorded
    except CheckpointError as e:
        fallback = latest_complete(parent(summary))
        if fallback is None:
            raise CheckpointError(f"{summary} records {recorded}, which cannot be used ({e}), and its run holds no other complete checkpoint") from None
        log.warning("%s records %s, which cannot be used (%s); using %s", summary, recorded, e, fallback)
        return fallback


def resolve_checkpoint(path: str) -> str:
    """The checkpoint (or exported model) location that ``path`` names; CheckpointError when there is none."""
    path = absolute(str(path))
    found = kind_of(path)
    if found == "missing":
        raise CheckpointError(f"checkpoint {path} does not exist")
    if found == "file" and name_of(path) == "summary.json":
        return _from_summary(path)
    if found == "dir" and not exists(join(path, META)) and not is_export(path):
        if exists(join(path, "summary.json")):
            return _from_summary(join(path, "summary.json"))
        newest = latest_complete(path)
        if newest is None:
            raise CheckpointError(f"{path} holds no complete bigray checkpoint")
        return newest
    return path


def local_checkpoint(path: str, kind: str | None = None) -> Path:
    """A complete checkpoint as a local directory: resolved, checked, copied down once per node when
    it lives in storage, and checked again there (pickles are scanned on the local copy)."""
    return checked_local_checkpoint(path, kind)[0]


def checked_local_checkpoint(path: str, kind: str | None = None) -> tuple[Path, dict[str, Any] | None]:
    """:func:`local_checkpoint` and the checkpoint's verified ``bigray.json`` (None for an exported
    model directory), so callers need not read and check it a second time."""
    location = resolve_checkpoint(path)
    if not is_dir(location):
        raise CheckpointError(f"checkpoint {location} is not a directory")
    if is_uri(location) and not is_export(location):
        read_meta(location, kind)  # from one listing, before anything is downloaded
    local = cached_copy(location, area="checkpoints")
    return local, None if is_export(str(local)) else read_meta(local, kind)


@dataclass(frozen=True)
class ServedModel:
    """The local copy of what a Serve replica loads, and where it came from (to release it)."""

    directory: Path
    """The checkpoint (or exported model) directory to load from: ``directory/model`` or the export."""
    source: str
    parts: tuple[str, ...]
    area: str

    @property
    def model_dir(self) -> Path:
        """The Hugging Face / model-card directory itself."""
        return self.directory / "model" if (self.directory / "model").is_dir() else self.directory

    def release(self) -> None:
        """Delete this node's copy (after a swap or at shutdown; a local checkpoint is left alone)."""
        drop_copy(self.source, self.parts, area=self.area)


def servable(path: str, kind: str) -> str:
    """The location of a model ready to serve: an exported/bare model directory, or a checkpoint
    that passes the completeness check; CheckpointError otherwise. Nothing is copied."""
    location = resolve_checkpoint(path)
    if not (is_export(location) or exists(join(location, "model.json"))):
        read_meta(location, kind)
    return location


def served_model(path: str, kind: str, area: str = "serve") -> ServedModel:
    """Check a checkpoint and copy down only what serving needs (``model/`` and its markers, never
    the ZeRO shards) into ``area`` of this node's cache (a replica's own), reused while unchanged."""
    location = servable(path, kind)
    parts = () if is_export(location) or exists(join(location, "model.json")) else MODEL_PARTS
    return ServedModel(cached_copy(location, parts, area=area), location, parts, area)
