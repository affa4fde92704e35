"""Validation loss per minute of training: bigray's CPU recipe against nanoGPT's README CPU example.

The split is nanoGPT's (data.split=tail): Shakespeare's 42 works joined in file-name order, GPT-2's
BPE, the first 90% of the tokens train and the last 10% validate. Each budget is its own run of
jobs/configs/gpt_cpu_budget.yaml with train.max_minutes set (the schedule ends with the budget),
through Ray Train as `bigray pretrain-gpt` runs it; the final model is then scored on every
validation token in non-overlapping 64-token windows. nanoGPT's figures (5.08 at 5 minutes, 4.74 at
10) were measured on this machine with the same split and scoring (issue "a better model per
minute").

Run: python bench/gpt_quality_per_minute.py [--minutes 5 10] [--set key=value ...] [--tag name]
(screening: --minutes 1.5 with --set overrides, compared at equal minutes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from common import CONFIGS, REPO, read_jsonl, save_result, scratch

from bigray.config import GPTPretrainConfig, load_config

NANOGPT = {5: 5.08, 10: 4.74}
SPLIT = ["data.tokenizer=gpt2", "data.split=tail", "data.val_fraction=0.1", "data.source=shakespeare"]


def score(model_dir: Path, tokens, window: int = 64, batch: int = 64) -> float:
    """Mean next-token loss over every validation token, in non-overlapping ``window``-token windows
    (each window predicts its tokens from the ones before them in it; the last window may be short)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    full = (len(ids) - 1) // window
    inputs, targets = ids[: full * window].view(full, window), ids[1 : full * window + 1].view(full, window)
    parts = [(inputs[i : i + batch], targets[i : i + batch]) for i in range(0, full, batch)]
    if full * window < len(ids) - 1:  # the short last window
        parts.append((ids[full * window : -1][None], ids[full * window + 1 :][None]))
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in parts:
            logits = model(input_ids=x).logits
            total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
            count += y.numel()
    return total / count


def run_budget(minutes: float, overrides: list[str], tag: str) -> dict:
    from bigray.data.text import prepare_text, with_absolute_paths
    from bigray.recipes.gpt import pretrain

    tmp = scratch("quality")
    data_dir = os.environ.get("BIGRAY_BENCH_DATA", str(REPO / "data"))
    cfg = load_config(
        GPTPretrainConfig,
        CONFIGS / "gpt_cpu_budget.yaml",
        [*SPLIT, f"data.cache_dir={data_dir}", f"train.max_minutes={minutes}", f"run.storage_path={tmp}", "run.name=q"]
        + overrides,
    )
    val = prepare_text(with_absolute_paths(cfg.data))[0].tokens("val")  # built once, then cached
    t0 = time.time()
    summary = pretrain(cfg)
    wall = time.time() - t0
    rows = [r for r in read_jsonl(tmp / "q" / "metrics.jsonl") if "train/tokens_per_s" in r]
    t1 = time.time()
    loss = score(Path(summary["checkpoint"]) / "model", val)
    return {
        "minutes": minutes,
        "tag": tag,
        "overrides": overrides,
        "val_loss_all_tokens_64": round(loss, 4),
        "nanogpt_val_loss": NANOGPT.get(int(minutes)) if minutes in NANOGPT else None,
        "steps": rows[-1]["step"],
        "train_minutes": round(rows[-1]["train/seconds"] / 60, 2),
        "tokens_per_s_median": round(statistics.median(r["train/tokens_per_s"] for r in rows[1:] or rows)),
        "mfu_median": round(statistics.median(r["train/mfu"] for r in rows[1:] or rows), 3),
        "wall_minutes": round(wall / 60, 2),
        "score_seconds": round(time.time() - t1, 1),
        "val_tokens": len(val),
    }


def main() -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[5.0, 10.0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tag", default="recipe")
    args = parser.parse_args()
    results = []
    for minutes in args.minutes:
        result = run_budget(minutes, args.overrides, args.tag)
        print(
            f"{args.tag} {minutes:g} min: val loss {result['val_loss_all_tokens_64']:.4f}"
            f" (nanoGPT {result['nanogpt_val_loss']}) {result['steps']} steps"
            f" {result['tokens_per_s_median']} tok/s mfu {100 * result['mfu_median']:.1f}%",
            flush=True,
        )
        results.append(result)
    save_result(f"gpt_quality_per_minute-{args.tag}", {"benchmark": "gpt_quality_per_minute", "runs": results})
    return results


if __name__ == "__main__":
    main()
