"""A user's first ResNet runs: short, on a subset. Test accuracy of `jobs/configs/resnet_fashion.yaml`
as shipped on the two runs issue 34 names, on Ray Train with 2 CPU workers:

- 2 epochs on 4,000 training images (target >= 80% test accuracy, goal 85%)
- 1 epoch on 2,000 images (target >= 75%)

    python bench/resnet_short_runs.py                             # both runs, the shipped defaults
    python bench/resnet_short_runs.py --set train.batch_size=16   # a variant (screening)

Every run scores the full 10,000-image test set.
"""

from __future__ import annotations

import argparse
import time

from common import CONFIGS, read_jsonl, save_result, scratch

from bigray.config import ResNetJobConfig, load_config

RUNS = {
    "2 epochs x 4,000 images": ["train.epochs=2", "data.max_train_samples=4000"],
    "1 epoch x 2,000 images": ["train.epochs=1", "data.max_train_samples=2000"],
}


def run(name: str, overrides: list[str]) -> dict:
    from bigray.recipes.resnet import train_resnet

    tmp = scratch("resnet-short")
    cfg = load_config(
        ResNetJobConfig, CONFIGS / "resnet_fashion.yaml", [*overrides, f"run.storage_path={tmp}", "run.name=short"]
    )
    t0 = time.time()
    train_resnet(cfg)
    rows = read_jsonl(tmp / "short" / "metrics.jsonl")
    return {
        "run": name,
        "overrides": overrides,
        "test_acc": rows[-1]["val/acc"],
        "acc_per_epoch": [round(r["val/acc"], 4) for r in rows],
        "train_loss_per_epoch": [round(r["train/loss"], 3) for r in rows],
        "steps": rows[-1]["step"],
        "global_batch": cfg.data.max_train_samples * cfg.train.epochs // rows[-1]["step"],
        "minutes": round((time.time() - t0) / 60, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], help="config override for every run (a variant)")
    parser.add_argument("--only", choices=("2x4000", "1x2000"), help="run one of the two")
    args = parser.parse_args()
    names = list(RUNS) if not args.only else [n for n in RUNS if n.startswith(args.only[0])]
    results = [run(name, [*RUNS[name], *args.set]) for name in names]
    for r in results:
        print(
            f"{r['run']:26} {' '.join(args.set) or '(defaults)'}: test acc {r['test_acc']:.4f} per epoch {r['acc_per_epoch']} "
            f"train loss {r['train_loss_per_epoch']} steps {r['steps']} global batch {r['global_batch']} {r['minutes']} min"
        )
    save_result("resnet_short_runs", {"set": args.set, "results": results})


if __name__ == "__main__":
    main()
