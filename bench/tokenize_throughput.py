"""Tokenization: the Ray Data pipeline (2 tokenizer actors) vs the single-process path, same corpus.

The corpus is Shakespeare's 42 works joined into ~5 MB files, repeated to ~50 MB and ~200 MB; both
paths use GPT-2's BPE (no training, so only tokenization is timed). Each run is a fresh process:
wall time, tokens/s, and peak RSS (the driver's, and the tokenizer actors' for the pipeline).
Prints tokens/s ratio and whether peak RSS grows with the corpus.
Run: python bench/tokenize_throughput.py [SIZES_MB...]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, save_result, scratch

RUN = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from bigray.config import TextDataConfig
from bigray.data.text import prepare_text
cfg = TextDataConfig(cache_dir={cache!r}, source="files", text_files={files!r}, tokenizer="gpt2", tokenize_workers={workers})
t0 = time.time()
_, stats = prepare_text(cfg)
print("RESULT " + json.dumps({{"seconds": time.time() - t0, "tokens": stats["tokens"], "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **stats.get("pipeline", {{}})}}))
"""


def corpus(root: Path, size_mb: int, downloads: Path) -> list[str]:
    sys.path.insert(0, str(REPO))
    from bigray.config import TextDataConfig
    from bigray.data.text import load_documents

    (root / "cache").mkdir(parents=True, exist_ok=True)
    if not (root / "cache" / "downloads").exists():
        (root / "cache" / "downloads").symlink_to(downloads)
    works = "\n\n".join(text for _, text in load_documents(TextDataConfig(cache_dir=str(root / "cache"))))
    n = max(1, round(size_mb * 1e6 / len(works.encode())))
    files = []
    for i in range(n):
        f = root / f"shakespeare-{size_mb}mb-{i:03d}.txt"
        f.write_text(works)
        files.append(str(f))
    return files


def run(files: list[str], workers: int, cache: Path) -> dict:
    code = RUN.format(repo=str(REPO), cache=str(cache), files=files, workers=workers)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-3000:])
    r = json.loads(lines[-1][len("RESULT ") :])
    tokens = r["tokens"]["train"] + r["tokens"]["val"]
    return {
        **r,
        "tokens_per_s": round(tokens / r["seconds"]),
        "seconds": round(r["seconds"], 1),
        "driver_peak_rss_mb": round(r["driver_peak_rss_mb"]),
    }


def main(sizes: list[int]) -> dict:
    tmp = scratch("tokenize")
    downloads = REPO / "data" / "downloads"
    if not downloads.is_dir():
        downloads.mkdir(parents=True)
    rows = {}
    for size in sizes:
        files = corpus(tmp, size, downloads)
        t0 = time.time()
        rows[f"{size}MB"] = {
            "files": len(files),
            "single_process": run(files, 0, tmp / f"c-{size}-process"),
            "ray_data_2_workers": run(files, 2, tmp / f"c-{size}-ray"),
            "bench_seconds": round(time.time() - t0),
        }
        single, ray = rows[f"{size}MB"]["single_process"], rows[f"{size}MB"]["ray_data_2_workers"]
        rows[f"{size}MB"]["tokens_per_s_ratio"] = round(ray["tokens_per_s"] / single["tokens_per_s"], 2)
    result = {"benchmark": "tokenize_throughput", "tokenizer": "gpt2", **rows}
    save_result("tokenize_throughput", result)
    return result


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [50, 200])
