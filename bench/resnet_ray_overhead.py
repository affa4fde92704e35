"""ResNet images/s under Ray Train DDP (2 workers x 1 thread) vs the same loop in one process
without Ray (2 threads): same total threads, same per-step global batch. Target ratio >= 0.9.
Run: python bench/resnet_ray_overhead.py
"""

from __future__ import annotations

from common import CONFIGS, read_jsonl, save_result, scratch

from bigray.config import ResNetJobConfig, load_config


def main(samples: int = 4096) -> dict:
    from bigray.recipes.resnet import train_local, train_resnet

    tmp = scratch("resnet-overhead")
    base = [
        f"data.max_train_samples={samples}",
        "data.max_eval_samples=512",
        "train.epochs=1",
        "train.precision=bf16",
        f"run.storage_path={tmp}",
    ]
    local_cfg = load_config(
        ResNetJobConfig,
        CONFIGS / "resnet_fashion.yaml",
        base + ["scaling.num_workers=1", "scaling.cpus_per_worker=2", "train.batch_size=128", "run.name=local"],
    )
    (tmp / "local").mkdir()
    train_local(local_cfg, str(tmp / "local"))
    local = read_jsonl(tmp / "local" / "metrics.jsonl")[-1]["train/images_per_s"]
    ray_cfg = load_config(
        ResNetJobConfig,
        CONFIGS / "resnet_fashion.yaml",
        base + ["scaling.num_workers=2", "scaling.cpus_per_worker=1", "train.batch_size=64", "run.name=ray"],
    )
    train_resnet(ray_cfg)
    ddp = read_jsonl(tmp / "ray" / "metrics.jsonl")[-1]["train/images_per_s"]
    result = {
        "benchmark": "resnet_ray_overhead",
        "images": samples,
        "global_batch": 128,
        "images_per_s_one_process_2_threads": round(local, 1),
        "images_per_s_ray_ddp_2x1_threads": round(ddp, 1),
        "ratio": round(ddp / local, 3),
        "target": ">= 0.9",
    }
    save_result("resnet_ray_overhead", result)
    return result


if __name__ == "__main__":
    main()
