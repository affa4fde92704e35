"""ResNet-18 (small stem) on the full Fashion-MNIST on this machine: test accuracy vs time.

Trains on Ray Train (2 CPU workers, bf16 autocast) for a fixed epoch budget sized to ~20 minutes,
records test accuracy after every epoch with the elapsed time, and saves the curve as a PNG.
Target: >= 91% test accuracy within 20 minutes of training.
Run: python bench/resnet_accuracy.py [epochs]
"""

from __future__ import annotations

import sys

from common import CONFIGS, OUT, read_jsonl, save_result, scratch

from bigray.config import ResNetJobConfig, load_config


def main(epochs: int = 3) -> dict:
    from bigray.recipes.resnet import train_resnet

    tmp = scratch("resnet-accuracy")
    # As shipped: the automatic global batch is 128 on the full data (64 per worker), lr 0.1 at it, bf16 on this CPU.
    cfg = load_config(
        ResNetJobConfig,
        CONFIGS / "resnet_fashion.yaml",
        [f"train.epochs={epochs}", f"run.storage_path={tmp}", "run.name=fashion"],
    )
    summary = train_resnet(cfg)
    rows = read_jsonl(tmp / "fashion" / "metrics.jsonl")
    elapsed, curve = 0.0, []
    for r in rows:
        elapsed += r["train/epoch_time_s"]
        curve.append({"epoch": r["epoch"], "train_minutes": round(elapsed / 60, 2), "test_acc": r["val/acc"]})
    _plot(curve)
    result = {
        "benchmark": "resnet_accuracy",
        "arch": cfg.model.arch,
        "workers": cfg.scaling.num_workers,
        "global_batch": cfg.train.global_batch_size or "auto (128 on the full data)",
        "augment": cfg.train.augment,
        "precision": cfg.train.precision,
        "curve": curve,
        "final_test_acc": curve[-1]["test_acc"],
        "train_minutes": curve[-1]["train_minutes"],
        "target": ">= 0.91 within 20 minutes",
        "images_per_s": rows[-1]["train/images_per_s"],
        "checkpoint": summary["checkpoint"],
    }
    save_result("resnet_accuracy", result)
    return result


def _plot(curve: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    OUT.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([0] + [c["train_minutes"] for c in curve], [0.1] + [c["test_acc"] for c in curve], marker="o")
    ax.axhline(0.91, color="gray", linestyle="--", label="91% target")
    ax.set_xlabel("training minutes (2 CPU workers)")
    ax.set_ylabel("Fashion-MNIST test accuracy")
    ax.set_title("ResNet-18 (small stem), Ray Train DDP")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUT / "resnet_accuracy.png", dpi=100)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
