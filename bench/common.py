"""Helpers shared by the benchmarks: repo paths, a scratch directory, result files."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs" / "configs"
OUT = Path(os.environ.get("BIGRAY_BENCH_OUT", REPO / "bench" / "out"))


def scratch(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"bigray-bench-{name}-"))


def save_result(name: str, result: dict[str, Any]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)


def median_after_warmup(rows: list[dict[str, Any]], key: str, skip: int = 3) -> float:
    values = [r[key] for r in rows if key in r][skip:]
    return statistics.median(values)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
