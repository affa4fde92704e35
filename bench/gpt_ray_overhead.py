"""Ray Train overhead: GPT tokens/s under TorchTrainer (1 worker) vs the same loop without Ray.

Same model, batch, DeepSpeed config and thread count; prints the ratio (target >= 0.95).
Run: python bench/gpt_ray_overhead.py
"""

from __future__ import annotations

from common import CONFIGS, median_after_warmup, read_jsonl, save_result, scratch

from bigray.config import GPTPretrainConfig, load_config
from bigray.data.text import prepare_text


def main(steps: int = 60) -> dict:
    tmp = scratch("gpt-overhead")
    overrides = [
        "scaling.num_workers=1",
        "scaling.cpus_per_worker=2",
        f"train.max_steps={steps}",
        "train.log_interval=5",
        f"train.eval_interval={steps}",
        f"run.checkpoint_interval={steps}",
        "train.eval_batches=1",
        f"run.storage_path={tmp}",
    ]
    cfg = load_config(GPTPretrainConfig, CONFIGS / "gpt_tiny.yaml", overrides + ["run.name=local"])
    prepare_text(cfg.data)

    from bigray.recipes.gpt import train_local

    (tmp / "local").mkdir()
    train_local(cfg, str(tmp / "local"))
    local = median_after_warmup(read_jsonl(tmp / "local" / "metrics.jsonl"), "train/tokens_per_s", skip=1)

    from bigray.recipes.gpt import pretrain

    ray_cfg = load_config(GPTPretrainConfig, CONFIGS / "gpt_tiny.yaml", overrides + ["run.name=ray"])
    summary = pretrain(ray_cfg)
    under_ray = median_after_warmup(read_jsonl(tmp / "ray" / "metrics.jsonl"), "train/tokens_per_s", skip=1)
    result = {
        "benchmark": "gpt_ray_overhead",
        "model": cfg.model.preset,
        "block_size": cfg.model.block_size,
        "micro_batch": cfg.train.micro_batch_size,
        "threads": cfg.scaling.threads,
        "steps": steps,
        "tokens_per_s_without_ray": round(local, 1),
        "tokens_per_s_ray_train": round(under_ray, 1),
        "ratio": round(under_ray / local, 3),
        "target": ">= 0.95",
        "ray_run": summary["run_dir"],
    }
    save_result("gpt_ray_overhead", result)
    return result


if __name__ == "__main__":
    main()
