"""Finding the model a user means: a checkpoint directory, a run directory (its newest complete
checkpoint), a ``summary.json`` (the checkpoint it records), or an exported model directory, each a
local path or a storage URI; or a Hugging Face Hub id (a base model).

:func:`resolve_checkpoint` only finds (nothing is copied); :func:`local_model` and
:func:`served_model` also check it with the one completeness check (checkpoint.read_meta) and copy
down, once per node, what the caller will load.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from bigray.artifacts.adapter import ADAPTER_CONFIG
from bigray.artifacts.checkpoint import META, CheckpointError, CheckpointMeta, latest_complete, model_files, read_meta
from bigray.artifacts.hf_gpt import hub_snapshot, is_hub_id
from bigray.artifacts.storage import (
    absolute,
    cached_copy,
    drop_copy,
    is_dir,
    is_file,
    is_uri,
    join,
    kind_of,
    name_of,
    parent,
    read_text,
)

log = logging.getLogger(__name__)

MODEL_PARTS = (META, "ranks", "model")
"""What a served model needs from a checkpoint: its metadata, the markers and ``model/`` (no ZeRO shards)."""


def is_export(location: str) -> bool:
    """An exported Hugging Face / model directory (weights + config, or a LoRA adapter; no bigray.json)."""
    return (is_file(join(location, "config.json")) or is_file(join(location, ADAPTER_CONFIG))) and not is_file(
        join(location, META)
    )


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
            raise CheckpointError(
                f"{summary} records {recorded}, which cannot be used ({e}), and its run holds no other complete checkpoint"
            ) from None
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
    if found == "dir" and not is_file(join(path, META)) and not is_export(path):
        if is_file(join(path, "summary.json")):
            return _from_summary(join(path, "summary.json"))
        newest = latest_complete(path)
        if newest is None:
            raise CheckpointError(f"{path} holds no complete bigray checkpoint")
        return newest
    return path


def local_model(path: str, kind: str | None = None) -> tuple[Path, CheckpointMeta | None]:
    """Wherever a model can be named, as this node's local copy, checked, and its verified metadata
    (None for an exported, downloaded or Hub model), so callers need not read and check it again.

    A Hub id is fetched by the one Hub policy (hf_gpt.hub_snapshot: safetensors, configs and the
    tokenizer, never pickles). A checkpoint, run directory or summary.json is resolved, checked,
    copied down once per node when it lives in storage, and checked again there (pickles are
    scanned on the local copy). :func:`checkpoint.model_files` is the model inside it.
    """
    if is_hub_id(path):
        return hub_snapshot(path), None
    location = resolve_checkpoint(path)
    if not is_dir(location):
        raise CheckpointError(f"checkpoint {location} is not a directory")
    if is_uri(location) and not is_export(location):
        read_meta(location, kind)  # from one listing, before anything is downloaded
    local = cached_copy(location, area="checkpoints")
    return local, None if is_export(str(local)) else read_meta(local, kind)


def local_checkpoint(path: str, kind: str | None = None) -> Path:
    """:func:`local_model`'s local directory alone."""
    return local_model(path, kind)[0]


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
        return model_files(self.directory)

    def release(self) -> None:
        """Delete this node's copy (after a swap or at shutdown; a local checkpoint is left alone)."""
        drop_copy(self.source, self.parts, area=self.area)


def servable(path: str, kind: str) -> str:
    """The location of a model ready to serve: an exported/bare model directory, or a checkpoint
    that passes the completeness check; CheckpointError otherwise. Nothing is copied."""
    location = resolve_checkpoint(path)
    if not (is_export(location) or is_file(join(location, "model.json"))):
        read_meta(location, kind)
    return location


def served_model(path: str, kind: str, area: str = "serve") -> ServedModel:
    """Check a checkpoint and copy down only what serving needs (``model/`` and its markers, never
    the ZeRO shards) into ``area`` of this node's cache (a replica's own), reused while unchanged."""
    location = servable(path, kind)
    parts = () if is_export(location) or is_file(join(location, "model.json")) else MODEL_PARTS
    return ServedModel(cached_copy(location, parts, area=area), location, parts, area)
