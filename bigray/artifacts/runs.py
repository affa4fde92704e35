"""Run directories: ``<storage_path>/<name>/`` holding config.yaml, metrics.jsonl, summary.json and
what Ray writes.

Every command that produces something ends with :func:`finish`, which saves ``summary.json``, lets
the caller record it (in the run's tracker) and prints it as one JSON line, the last line of the
output that scripts and ``ray job logs`` read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import yaml

from bigray.artifacts.storage import delete_file, is_file, join, read_text, write_text
from bigray.config import to_dict

METRICS = "metrics.jsonl"
FAILURE = "failure.json"


def save_resolved_config(directory: str, cfg: Any) -> None:
    """``config.yaml``: the job's config after overrides and path pinning (what the run really used)."""
    write_text(directory + "/config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))


def append_metrics(directory: str | Path, metrics: dict[str, Any]) -> None:
    """One line of ``metrics.jsonl`` per report, in a local directory (RunLog uploads it to storage)."""
    with open(Path(directory) / METRICS, "a") as f:
        f.write(json.dumps(metrics) + "\n")


def read_metrics(directory: str) -> list[dict[str, Any]]:
    """Every report in a run's ``metrics.jsonl``, local or in storage (empty when there is none)."""
    path = join(directory, METRICS)
    return [json.loads(line) for line in read_text(path).splitlines()] if is_file(path) else []


def record_failure(directory: str, reason: str) -> None:
    """``failure.json``: why the workers stopped a run that a retry cannot fix (read by the driver)."""
    write_text(f"{directory}/{FAILURE}", json.dumps({"reason": reason}) + "\n")


def recorded_failure(directory: str) -> str | None:
    """The reason :func:`record_failure` left in a run directory, if any."""
    path = f"{directory}/{FAILURE}"
    if not is_file(path):
        return None
    try:
        return str(json.loads(read_text(path))["reason"])
    except (ValueError, KeyError, TypeError):
        return f"the workers stopped the run ({path} is unreadable)"


def clear_failure(directory: str) -> None:
    """Forget an earlier attempt's failure before running again under the same name."""
    delete_file(f"{directory}/{FAILURE}")


def jsonable(obj: Any) -> Any:
    """``obj`` with tensors/numpy scalars as numbers and non-finite floats as strings (valid JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return jsonable(obj.item())
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def finish(
    directory: str,
    checkpoint: str | None,
    metrics: dict[str, Any],
    record: Callable[[dict[str, Any]], None] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Save summary.json in the run directory, hand it to ``record`` (before printing: a tracker's
    own output must not come after the summary line), then print it as the last, one-line JSON output."""
    summary = jsonable({"run_dir": directory, "checkpoint": checkpoint, "metrics": metrics, **extra})
    write_text(directory + "/summary.json", json.dumps(summary, indent=2) + "\n")
    if record is not None:
        record(summary)
    print(json.dumps(summary), flush=True)
    return summary
