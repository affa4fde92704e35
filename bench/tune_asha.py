"""ASHA vs running every trial to completion: same search space, same seed, ResNet on Fashion-MNIST.

Prints the trial-iterations (epochs) each search spent and the best test accuracy each found.
Target: the same best (within 1 point) for <= 50% of the compute.
Run: python bench/tune_asha.py
"""

from __future__ import annotations

import csv
from pathlib import Path

from common import CONFIGS, save_result, scratch

from bigray.config import TuneJobConfig, load_config


def search(tmp: Path, scheduler: str) -> dict:
    from bigray.tune import run_search

    job = load_config(
        TuneJobConfig,
        CONFIGS / "tune_resnet.yaml",
        [
            f"tune.scheduler={scheduler}",
            "tune.num_samples=6",
            "tune.seed=0",
            "tune.space={train.lr: {loguniform: [0.012, 3.2]}}"  # at the reference batch 128 (runs use 32),
            "trainer.data.max_train_samples=2000",
            "trainer.data.max_eval_samples=1000",
            "trainer.train.epochs=4",
            "trainer.train.batch_size=32",
            f"run.storage_path={tmp}",
            f"run.name={scheduler}",
            # 0.99 + the trial driver's 0.01 CPU: two trials at once on this 2-CPU machine.
            "trainer.scaling.cpus_per_worker=0.99",
        ],
    )
    summary = run_search(job)
    with open(Path(summary["run_dir"]) / "results.csv") as f:
        rows = list(csv.DictReader(f))
    return {
        "trial_iterations": sum(int(r["iterations"]) for r in rows),
        "best_acc": summary["metrics"]["val/acc"],
        "best_lr": summary["best_config"]["train"]["lr"],
        "statuses": [r["status"] for r in rows],
    }


def main() -> dict:
    tmp = scratch("tune-asha")
    full = search(tmp, "fifo")
    asha = search(tmp, "asha")
    result = {
        "benchmark": "tune_asha",
        "trials": 6,
        "max_epochs": 4,
        "every_trial_to_completion": full,
        "asha": asha,
        "compute_ratio": round(asha["trial_iterations"] / full["trial_iterations"], 3),
        "best_acc_difference_points": round(100 * (full["best_acc"] - asha["best_acc"]), 2),
        "target": "compute_ratio <= 0.5 and difference <= 1 point",
    }
    save_result("tune_asha", result)
    return result


if __name__ == "__main__":
    main()
