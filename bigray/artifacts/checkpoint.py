"""One checkpoint directory format, used by training, tuning, export and serving.

A checkpoint directory holds:

- ``bigray.json``: kind (gpt/resnet), step or epoch, the resolved job config, world size and the
  ranks that must have written (rank 0 writes it);
- ``ranks/rank_<r>.json``: one per writing rank, listing the files that rank wrote with sizes;
- the payload, per file kind:
  ``model/`` safetensors weights + config + tokenizer or model card (no pickle);
  ``rng/rank_<r>.safetensors`` per-rank RNG state (GPT; no pickle);
  ``deepspeed/**.pt`` ZeRO shards (GPT) and ``train_state.pt`` optimizer state (ResNet): torch
  pickles, only ever loaded with ``weights_only=True`` and the few non-tensor types DeepSpeed stores
  allow-listed in :data:`PICKLE_ALLOWED`.

Each rank writes into its own local directory and Ray merges them in storage. A checkpoint is
*complete* only when ``bigray.json`` is well formed, every expected rank's marker is well formed
and its files are there with the right sizes, and no pickle in it needs a type outside the
allow-list. :func:`read_meta` is the one check every reader uses; anything else is refused with a
:class:`CheckpointError` saying what is wrong, never another exception.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from bigray.artifacts.storage import StorageError, atomic_write_bytes, file_sizes, is_dir, is_uri, join, name_of, read_text, subdirs

log = logging.getLogger(__name__)

FORMAT = "bigray-checkpoint-v1"
META = "bigray.json"

PICKLE_ALLOWED = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})  # fmt: skip
"""Types (besides torch's own weights-only set) that DeepSpeed's checkpoint pickles may hold."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, unsafe, or was written by a different kind of job."""


def write_rank_marker(directory: str | Path, rank: int) -> None:
    """Record every file this rank wrote under ``directory`` (call last, after the payload)."""
    directory = Path(directory)
    files = {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.parent.name != "ranks"
    }
    atomic_write_bytes(directory / "ranks" / f"rank_{rank}.json", json.dumps({"rank": rank, "files": files}, indent=1).encode())


def write_meta(directory: str | Path, meta: dict[str, Any]) -> None:
    """Write ``bigray.json`` (rank 0, after its payload)."""
    atomic_write_bytes(Path(directory, META), json.dumps({"format": FORMAT, **meta}, indent=2).encode())


def _read_json(path: str, what: str) -> Any:
    try:
        return json.loads(read_text(path))
    except (OSError, ValueError, StorageError) as e:
        raise CheckpointError(f"{what} {path} is unreadable: {e}") from None


def unsafe_pickled_types(path: str | Path) -> list[str]:
    """The types a torch pickle needs beyond torch's weights-only set and :data:`PICKLE_ALLOWED`.

    Reads only the pickle's opcodes (nothing is unpickled, no tensor data is read).
    """
    import torch

    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # not a torch zip file, or a damaged one
        raise CheckpointError(f"{path} is not a readable torch checkpoint file: {e}") from None
    return sorted(set(needed) - PICKLE_ALLOWED)


def read_meta(directory: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Read and verify a checkpoint (a local directory or a URI); raise CheckpointError naming what is
    wrong (and nothing else).

    The pickle scan needs the files themselves: it runs on local directories, which is where every
    load happens (a URI is checked here from one listing, then copied down and checked again).
    """
    directory = str(directory)
    try:
        present = file_sizes(directory) if is_dir(directory) else None
    except StorageError as e:
        raise CheckpointError(str(e)) from None
    if present is None:
        raise CheckpointError(f"checkpoint {directory} does not exist")
    meta_path = join(directory, META)
    if META not in present:
        raise CheckpointError(f"{directory} is not a bigray checkpoint (no {META})")
    meta = _read_json(meta_path, "checkpoint metadata")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{directory} has format {found!r}, expected {FORMAT!r}")
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{directory} is a {meta.get('kind')} checkpoint, not a {kind} checkpoint")
    ranks = meta.get("writer_ranks")
    if not isinstance(ranks, list) or not ranks or not all(isinstance(r, int) for r in ranks):
        raise CheckpointError(f"{meta_path} has no valid writer_ranks (a list of the ranks that wrote the checkpoint)")
    for key in ("step", "world_size", "config"):
        if key not in meta:
            raise CheckpointError(f"{meta_path} lacks '{key}'")
    for rank in ranks:
        marker = f"ranks/rank_{rank}.json"
        if marker not in present:
            raise CheckpointError(f"checkpoint {directory} is incomplete: rank {rank} never finished writing")
        files = _read_json(join(directory, marker), f"rank {rank}'s marker")
        files = files.get("files") if isinstance(files, dict) else None
        if not isinstance(files, dict) or not all(isinstance(s, int) for s in files.values()):
            raise CheckpointError(f"rank {rank}'s marker {join(directory, marker)} does not list its files with their sizes")
        for rel, size in files.items():
            if present.get(rel) != size:
                raise CheckpointError(f"checkpoint {directory} is incomplete: {rel} from rank {rank} is missing or truncated")
    if not is_uri(directory):
        for rel in sorted(r for r in present if r.endswith(".pt")):
            unsafe = unsafe_pickled_types(Path(directory, rel))
            if unsafe:
                raise CheckpointError(
                    f"{Path(directory, rel)} needs {', '.join(unsafe)} to load, which bigray never unpickles (not an allow-listed type): refusing it"
                )
    return meta


def is_complete(directory: str | Path, kind: str | None = None) -> bool:
    """Whether :func:`read_meta` accepts the checkpoint."""
    try:
        read_meta(directory, kind)
        return True
    except CheckpointError:
        return False


def latest_complete(run_directory: str | Path, kind: str | None = None) -> str | None:
    """The newest complete checkpoint under a run directory or URI (Ray names them checkpoint_*).

    Newer checkpoints that are refused are skipped, each with one warning saying why.
    """
    try:
        found = subdirs(str(run_directory))
    except StorageError as e:
        raise CheckpointError(str(e)) from None
    for c in sorted((d for d in found if name_of(d).startswith("checkpoint")), key=name_of, reverse=True):
        try:
            read_meta(c, kind)
            return c
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", name_of(c), e)
    return None
