"""Finding the checkpoint a user means: a checkpoint directory, a run directory (its newest complete
checkpoint), a ``summary.json`` (the checkpoint it records) or a storage URI of any of those."""

from __future__ import annotations

import json
from pathlib import Path

from bigray.artifacts.checkpoint import CheckpointError, latest_complete
from bigray.artifacts.storage import local_dir


def resolve_checkpoint(path: str) -> Path:
    """The checkpoint (or model) directory that ``path`` names; CheckpointError when there is none."""
    p = Path(path)
    if p.is_file() and p.name == "summary.json":
        ckpt = json.loads(p.read_text()).get("checkpoint")
        if not ckpt:
            raise CheckpointError(f"{p} records no checkpoint")
        return Path(ckpt)
    if p.is_dir() and not (p / "bigray.json").exists() and not (p / "config.json").exists():
        if (p / "summary.json").is_file():
            return resolve_checkpoint(str(p / "summary.json"))
        found = latest_complete(p)
        if found is None:
            raise CheckpointError(f"{p} holds no complete bigray checkpoint")
        return found
    return p


def gpt_model_dir(path: str) -> Path:
    """The Hugging Face directory of a GPT checkpoint, run directory, summary.json or export (or a URI of one)."""
    p = local_dir(path)
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        return p
    ckpt = resolve_checkpoint(str(p))
    if (ckpt / "model" / "model.safetensors").is_file():
        return ckpt / "model"
    raise CheckpointError(f"{path} holds no GPT weights (expected model.safetensors)")


def resnet_checkpoint_dir(path: str) -> Path:
    """The checkpoint directory of a ResNet checkpoint, run directory or summary.json (or a URI of one)."""
    p = local_dir(path)
    if (p / "model" / "model.json").is_file() or (p / "model.json").is_file():
        return p
    return resolve_checkpoint(str(p))
