"""Finding the checkpoint a user means: a checkpoint directory, a run directory (its newest complete
checkpoint), a ``summary.json`` (the checkpoint it records) or a storage URI of any of those.

Whatever is found goes through the one completeness check (checkpoint.read_meta) before use.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from bigray.artifacts.checkpoint import CheckpointError, latest_complete, read_meta
from bigray.artifacts.storage import local_dir

log = logging.getLogger(__name__)


def _from_summary(summary: Path) -> Path:
    """The checkpoint a summary.json records; if retention deleted it (or it is incomplete), the run's
    newest complete checkpoint instead."""
    try:
        recorded = json.loads(summary.read_text()).get("checkpoint")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{summary} is not a readable bigray summary: {e}") from None
    if not recorded or not isinstance(recorded, str):
        raise CheckpointError(f"{summary} records no checkpoint")
    ckpt = Path(recorded)
    if (ckpt / "config.json").is_file() and not (ckpt / "bigray.json").exists():
        return ckpt  # an exported model directory
    try:
        read_meta(ckpt)
        return ckpt
    except CheckpointError as e:
        fallback = latest_complete(summary.parent)
        if fallback is None:
            raise CheckpointError(f"{summary} records {ckpt}, which cannot be used ({e}), and its run holds no other complete checkpoint") from None
        log.warning("%s records %s, which cannot be used (%s); using %s", summary, ckpt, e, fallback)
        return fallback


def resolve_checkpoint(path: str) -> Path:
    """The checkpoint (or model) directory that ``path`` names; CheckpointError when there is none."""
    p = Path(path)
    if p.is_file() and p.name == "summary.json":
        return _from_summary(p)
    if p.is_dir() and not (p / "bigray.json").exists() and not (p / "config.json").exists():
        if (p / "summary.json").is_file():
            return _from_summary(p / "summary.json")
        found = latest_complete(p)
        if found is None:
            raise CheckpointError(f"{p} holds no complete bigray checkpoint")
        return found
    return p


def gpt_model_dir(path: str) -> Path:
    """The Hugging Face directory of a GPT checkpoint (checked complete), run directory, summary.json
    or export (or a URI of one)."""
    p = local_dir(path)
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        return p
    ckpt = resolve_checkpoint(str(p))
    read_meta(ckpt, "gpt")
    return ckpt / "model"


def resnet_checkpoint_dir(path: str) -> Path:
    """The checkpoint directory (checked complete) of a ResNet checkpoint, run directory or
    summary.json, or a bare model directory (or a URI of one)."""
    p = local_dir(path)
    if (p / "model.json").is_file():
        return p
    ckpt = resolve_checkpoint(str(p))
    read_meta(ckpt, "resnet")
    return ckpt
