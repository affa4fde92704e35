"""One checkpoint directory format, used by training, tuning, export and serving.

A checkpoint directory holds:

- ``bigray.json``: a :class:`CheckpointMeta` (kind, step, epoch, the resolved job config, world size,
  the ranks that must have written, ...; rank 0 writes it);
- ``ranks/rank_<r>.json``: one per writing rank, listing the files that rank wrote with sizes;
- the payload, per file kind:
  ``model/`` safetensors weights + config + tokenizer or model card (no pickle);
  ``rng/rank_<r>.safetensors`` per-rank RNG state (older GPT checkpoints; no pickle; not read);
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

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigray.artifacts.storage import (
    StorageError,
    atomic_write_bytes,
    file_sizes,
    is_dir,
    is_uri,
    join,
    name_of,
    read_text,
    subdirs,
)

log = logging.getLogger(__name__)

FORMAT = "bigray-checkpoint-v1"
META = "bigray.json"

PICKLE_ALLOWED = frozenset(
    {
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)
"""Types (besides torch's own weights-only set) that DeepSpeed's checkpoint pickles may hold."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, unsafe, or was written by a different kind of job."""


UNIVERSAL = "universal"
"""Beside ``deepspeed/``: the ZeRO state converted to DeepSpeed's Universal Checkpoint format, for a
resume at another world size (train/engine.py universal_state)."""
UNIVERSAL_FILES = "files.json"
"""In ``universal/``, written last: every file of the conversion with its size."""


def check_universal(directory: str, present: dict[str, int] | None = None) -> None:
    """Refuse a checkpoint whose ``universal/`` is not whole (an interrupted upload, a truncated copy),
    naming what is wrong: DeepSpeed would fail somewhere inside its loader, or load part of it.
    ``present``: the checkpoint's files with their sizes, when the caller has listed them."""
    prefix = UNIVERSAL + "/"
    present = file_sizes(directory) if present is None else present
    mine = {rel[len(prefix) :]: n for rel, n in present.items() if rel.startswith(prefix)}
    if not mine:
        return
    try:
        listed = json.loads(read_text(join(directory, UNIVERSAL, UNIVERSAL_FILES)))
    except (OSError, ValueError, StorageError):
        listed = None
    if not isinstance(listed, dict):
        problem = f"it has no readable {UNIVERSAL_FILES}"
    else:
        problem = next((f"{rel} is missing or truncated" for rel, n in listed.items() if mine.get(rel) != n), "")
    if problem:
        raise CheckpointError(
            f"the Universal Checkpoint {join(directory, UNIVERSAL)} is incomplete ({problem}): delete that "
            "directory and resume again to convert the checkpoint again"
        )


def write_rank_marker(directory: str | Path, rank: int) -> None:
    """Record every file this rank wrote under ``directory`` (call last, after the payload)."""
    directory = Path(directory)
    files = {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.parent.name != "ranks"
    }
    atomic_write_bytes(
        directory / "ranks" / f"rank_{rank}.json", json.dumps({"rank": rank, "files": files}, indent=1).encode()
    )


@dataclass(frozen=True)
class CheckpointMeta:
    """What ``bigray.json`` says about a checkpoint: :func:`write_meta` writes it, :func:`read_meta`
    reads it back only after checking the whole checkpoint."""

    kind: str
    """The job kind that wrote it: "gpt" (pretraining and fine-tuning) or "resnet"."""
    step: int
    """Optimizer steps taken when it was written."""
    world_size: int
    """Workers of the run that wrote it."""
    writer_ranks: list[int]
    """The ranks whose marker must be there for the checkpoint to be complete."""
    config: dict[str, Any]
    """The resolved job config, as a dict."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """The metrics reported with it."""
    epoch: int | None = None
    """Epochs completed (ResNet)."""
    zero_stage: int | None = None
    """The ZeRO stage of its shards (GPT)."""
    model_shape: list[int] | None = None
    """(layers, heads, width, vocab) of the model (GPT; absent before fine-tuning existed)."""
    tokenizer_sha256: str | None = None
    """The tokenizer the model was trained with (GPT)."""
    segments: list[dict[str, Any]] | None = None
    """The run's history: each stretch of steps trained between two starts, at one world size
    (``{from_step, to_step, world_size}``, and ``lost_s`` for a stretch that resumed: train/context.py
    Stretch), oldest first; absent in checkpoints from before it."""
    train_seconds: float | None = None
    """Wall-clock seconds of training steps up to it (GPT): what train.max_minutes counts."""
    saved_at: float | None = None
    """When rank 0 wrote it (epoch seconds; write_meta stamps it)."""

    @classmethod
    def from_json(cls, raw: Any, where: str) -> CheckpointMeta:
        """Parse ``bigray.json``'s contents, naming the first field that is missing or malformed."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise CheckpointError(f"{where} has format {found!r}, expected {FORMAT!r}")
        ranks = raw.get("writer_ranks")
        if not isinstance(ranks, list) or not ranks or not all(isinstance(r, int) for r in ranks):
            raise CheckpointError(f"{where} has no valid writer_ranks (a list of the ranks that wrote the checkpoint)")
        for key, kind in (("kind", str), ("step", int), ("world_size", int), ("config", dict)):
            if key not in raw:
                raise CheckpointError(f"{where} lacks '{key}'")
            if not isinstance(raw[key], kind):
                raise CheckpointError(f"{where}: '{key}' is {raw[key]!r}, not a {kind.__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


def resizes(segments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The world-size changes in a run's history: at which step, from and to how many workers, and
    the seconds the change cost (the new stretch's ``lost_s``, where recorded)."""
    return [
        {"step": b["from_step"], "from": a["world_size"], "to": b["world_size"], "seconds_lost": b.get("lost_s")}
        for a, b in zip(segments, segments[1:])
        if a["world_size"] != b["world_size"]
    ]


def write_meta(directory: str | Path, meta: CheckpointMeta) -> None:
    """Write ``bigray.json`` (rank 0, after its payload), stamped with the time."""
    meta = dataclasses.replace(meta, saved_at=meta.saved_at or time.time())
    fields = {k: v for k, v in dataclasses.asdict(meta).items() if v is not None}
    atomic_write_bytes(Path(directory, META), json.dumps({"format": FORMAT, **fields}, indent=2).encode())


def model_files(location: str | Path) -> Path:
    """The model itself (config, weights, tokenizer or card) at a local location: a checkpoint's
    ``model/``, or an exported or downloaded model directory as it is."""
    location = Path(location)
    return location / "model" if (location / META).is_file() else location


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


def read_meta(directory: str | Path, kind: str | None = None) -> CheckpointMeta:
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
    raw = _read_json(meta_path, "checkpoint metadata")
    if isinstance(raw, dict) and raw.get("format") == FORMAT and kind is not None and raw.get("kind") != kind:
        raise CheckpointError(f"{directory} is a {raw.get('kind')} checkpoint, not a {kind} checkpoint")
    meta = CheckpointMeta.from_json(raw, meta_path)
    for rank in meta.writer_ranks:
        marker = f"ranks/rank_{rank}.json"
        if marker not in present:
            raise CheckpointError(f"checkpoint {directory} is incomplete: rank {rank} never finished writing")
        files = _read_json(join(directory, marker), f"rank {rank}'s marker")
        files = files.get("files") if isinstance(files, dict) else None
        if not isinstance(files, dict) or not all(isinstance(s, int) for s in files.values()):
            raise CheckpointError(
                f"rank {rank}'s marker {join(directory, marker)} does not list its files with their sizes"
            )
        for rel, size in files.items():
            if present.get(rel) != size:
                raise CheckpointError(
                    f"checkpoint {directory} is incomplete: {rel} from rank {rank} is missing or truncated"
                )
    check_universal(directory, present)
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


def resume_point(own: str | None, resume_from: str, run_directory: str | None, kind: str) -> str | None:
    """The one rule for what a run continues from, which the driver checks and every worker loads.

    The run's own newest checkpoint (after a worker restart, or a re-run of the same run name) wins;
    else the job's explicit ``resume_from``; else nothing. An own checkpoint whose write was
    interrupted is never loaded: the newest complete one in ``run_directory`` takes its place.
    """
    if own and not is_complete(own, kind):
        fallback = latest_complete(run_directory, kind) if run_directory else None
        log.warning(
            "checkpoint %s is incomplete; %s",
            own,
            f"resuming from {fallback} instead" if fallback else "not resuming from it",
        )
        own = fallback
    return own or resume_from or None
