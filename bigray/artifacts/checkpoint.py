"""One checkpoint directory format, used by training, tuning, export and serving.

A checkpoint directory holds:

- ``bigray.json``: kind (gpt/resnet), step or epoch, the resolved job config, world size and the
  ranks that must have written (rank 0 writes it);
- ``ranks/rank_<r>.json``: one per writing rank, listing the files that rank wrote with sizes;
- the payload: ``deepspeed/`` ZeRO shards and ``rng/`` per-rank RNG state (GPT), ``model/``
  safetensors weights + config + tokenizer or model card (loadable without unpickling),
  ``train_state.pt`` optimizer state (ResNet, loaded with ``weights_only=True``).

Each rank writes into its own local directory and Ray merges them in storage. A checkpoint is
*complete* only when ``bigray.json`` exists and every expected rank's marker and listed files are
there with the right sizes; anything else is refused with a message saying what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FORMAT = "bigray-checkpoint-v1"
META = "bigray.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or was written by a different kind of job."""


def write_rank_marker(directory: str | Path, rank: int) -> None:
    """Record every file this rank wrote under ``directory`` (call last, after the payload)."""
    directory = Path(directory)
    files = {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.parent.name != "ranks"
    }
    marker = directory / "ranks" / f"rank_{rank}.json"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"rank": rank, "files": files}, indent=1))


def write_meta(directory: str | Path, meta: dict[str, Any]) -> None:
    """Write ``bigray.json`` (rank 0, after its payload)."""
    Path(directory, META).write_text(json.dumps({"format": FORMAT, **meta}, indent=2))


def read_meta(directory: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Read and verify a checkpoint; raise CheckpointError naming what is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    meta_path = directory / META
    if not meta_path.is_file():
        raise CheckpointError(f"{directory} is not a bigray checkpoint (no {META})")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{meta_path} is unreadable: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory} has format {meta.get('format')!r}, expected {FORMAT!r}")
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{directory} is a {meta.get('kind')} checkpoint, not a {kind} checkpoint")
    for rank in meta["writer_ranks"]:
        marker = directory / "ranks" / f"rank_{rank}.json"
        if not marker.is_file():
            raise CheckpointError(f"checkpoint {directory} is incomplete: rank {rank} never finished writing")
        for rel, size in json.loads(marker.read_text())["files"].items():
            p = directory / rel
            if not p.is_file() or p.stat().st_size != size:
                raise CheckpointError(f"checkpoint {directory} is incomplete: {rel} from rank {rank} is missing or truncated")
    return meta


def is_complete(directory: str | Path, kind: str | None = None) -> bool:
    """Whether :func:`read_meta` accepts the checkpoint."""
    try:
        read_meta(directory, kind)
        return True
    except CheckpointError:
        return False


def latest_complete(run_directory: str | Path, kind: str | None = None) -> Path | None:
    """The newest complete checkpoint under a run directory (Ray names them checkpoint_*)."""
    candidates = sorted(Path(run_directory).glob("checkpoint*"), key=lambda p: p.name, reverse=True)
    return next((c for c in candidates if is_complete(c, kind)), None)
