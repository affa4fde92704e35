"""Run directories: ``<storage_path>/<name>/`` holding config.yaml, summary.json and what Ray writes.

The storage path may be local or any URI pyarrow understands (s3://, gs://), as Ray Train accepts.
Every command that produces something ends with :func:`finish`, which saves ``summary.json`` and
prints it as one JSON line, the last line of the output that scripts and ``ray job logs`` read.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

from bigray.config import to_dict


def is_uri(path: str) -> bool:
    return "://" in path


def run_dir(storage_path: str, name: str) -> str:
    """Absolute local path or URI of a run's directory."""
    if is_uri(storage_path):
        return storage_path.rstrip("/") + "/" + name
    return str(Path(storage_path).expanduser().resolve() / name)


def storage_root(storage_path: str) -> str:
    """The storage path in the absolute form Ray Train wants."""
    return storage_path if is_uri(storage_path) else str(Path(storage_path).expanduser().resolve())


def write_text(path: str, text: str) -> None:
    """Write a small text file to a local path or a storage URI."""
    if is_uri(path):
        import pyarrow.fs as pafs

        fs, p = pafs.FileSystem.from_uri(path)
        fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(p) as f:
            f.write(text.encode())
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    Path(tmp).write_text(text)
    os.replace(tmp, path)


def read_text(path: str) -> str:
    if is_uri(path):
        import pyarrow.fs as pafs

        fs, p = pafs.FileSystem.from_uri(path)
        with fs.open_input_stream(p) as f:
            return f.read().decode()
    return Path(path).read_text()


def save_resolved_config(directory: str, cfg: Any) -> None:
    write_text(directory + "/config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return _jsonable(obj.item())
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def finish(directory: str, checkpoint: str | None, metrics: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Save summary.json in the run directory and print it as the last, one-line JSON output."""
    summary = _jsonable({"run_dir": directory, "checkpoint": checkpoint, "metrics": metrics, **extra})
    write_text(directory + "/summary.json", json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)
    return summary
