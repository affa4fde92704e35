"""CPU MFU of the tiny GPT preset against the matmul peak measured on this machine, and what the
quickstart GPT reaches in a fixed budget: val loss, perplexity and a generated sample.

Runs jobs/configs/gpt_tiny.yaml as-is (2 Ray Train workers x 1 thread, ZeRO-2, 240 steps).
Run: python bench/gpt_cpu.py
"""

from __future__ import annotations

import statistics
import time

from common import CONFIGS, read_jsonl, save_result, scratch

from bigray.config import GPTPretrainConfig, load_config


def main() -> dict:
    import torch

    from bigray.export import export_gpt
    from bigray.quickstart import generate_sample
    from bigray.recipes.gpt import pretrain
    from bigray.train.metrics import measure_matmul_peak

    torch.set_num_threads(1)
    peak_fp32 = measure_matmul_peak(torch.float32, seconds=1.0)
    tmp = scratch("gpt-cpu")
    cfg = load_config(GPTPretrainConfig, CONFIGS / "gpt_tiny.yaml", [f"run.storage_path={tmp}", "run.name=tiny"])
    t0 = time.time()
    summary = pretrain(cfg)
    minutes = (time.time() - t0) / 60
    rows = read_jsonl(tmp / "tiny" / "metrics.jsonl")
    export_gpt(summary["checkpoint"], str(tmp / "hf"))
    result = {
        "benchmark": "gpt_cpu",
        "preset": cfg.model.preset,
        "block_size": cfg.model.block_size,
        "workers": cfg.scaling.num_workers,
        "threads_per_worker": cfg.scaling.threads,
        "steps": cfg.train.max_steps,
        "matmul_peak_gflops_1_thread_fp32": round(peak_fp32 / 1e9, 1),
        "mfu_median": round(statistics.median(r["train/mfu"] for r in rows[1:]), 3),
        "tflops_per_worker_median": round(statistics.median(r["train/tflops_per_worker"] for r in rows[1:]), 4),
        "tokens_per_s_median": round(statistics.median(r["train/tokens_per_s"] for r in rows[1:])),
        "wall_minutes_including_startup": round(minutes, 2),
        "val_loss": round(summary["metrics"]["val/loss"], 3),
        "val_perplexity": round(summary["metrics"]["val/perplexity"], 1),
        "sample": generate_sample(tmp / "hf", "ROMEO:\n", max_new_tokens=60, seed=0),
    }
    save_result("gpt_cpu", result)
    return result


if __name__ == "__main__":
    main()
