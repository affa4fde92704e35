"""Seconds to resume a GPT-2 124m ZeRO checkpoint at another world size, against the same-size resume.

Trains the 124m preset (the corpus's 8k BPE, block 128, micro batch 1, global batch 2, fp32) for one
step on 2 workers, checkpointed; then resumes that checkpoint for one more step on 2 workers (each
rank loads its own shard) and on 1 worker (the shards converted once to a Universal Checkpoint,
then re-partitioned on load), and prints each resume's ``startup/resume_s`` (the trainer's resume
phase: choosing, checking, converting and loading the checkpoint) with the ratio. A second 1-worker
resume shows the cost once the conversion is cached beside the checkpoint.
Run: python bench/resume_world_size.py [stage ...]   (default: 2 3)
"""

from __future__ import annotations

import sys

from common import CONFIGS, read_jsonl, save_result, scratch

from bigray.config import GPTPretrainConfig, load_config


def run(stage: int, tmp, name: str, workers: int, steps: int, *extra: str) -> dict:
    from bigray.recipes.gpt import pretrain

    cfg = load_config(
        GPTPretrainConfig,
        CONFIGS / "gpt_tiny.yaml",
        [
            "model.preset=124m",
            "model.block_size=128",
            f"data.cache_dir={tmp}/data",
            "data.max_chars=2000000",
            "train.micro_batch_size=1",
            "train.global_batch_size=2",
            f"train.max_steps={steps}",
            "train.eval_batches=1",
            "train.warmup_steps=1",
            "run.checkpoint_interval=1",
            "deepspeed.precision=fp32",
            f"deepspeed.zero_stage={stage}",
            f"scaling.num_workers={workers}",
            f"run.storage_path={tmp}/runs",
            f"run.name={name}",
            *extra,
        ],
    )
    pretrain(cfg)
    return read_jsonl(tmp / "runs" / name / "metrics.jsonl")[0]


def main(stages: list[int]) -> dict:
    rows = []
    for stage in stages:
        tmp = scratch(f"resume-zero{stage}")
        run(stage, tmp, "two", 2, 1)
        ckpt = f"resume_from={tmp}/runs/two/checkpoint_step_0000001"
        same = run(stage, tmp, "same", 2, 2, ckpt)["startup/resume_s"]
        other = run(stage, tmp, "one", 1, 2, ckpt)["startup/resume_s"]
        cached = run(stage, tmp, "one-again", 1, 2, ckpt)["startup/resume_s"]
        rows.append(
            {
                "zero_stage": stage,
                "same_size_resume_s": same,
                "other_size_resume_s": other,
                "other_size_cached_s": cached,
                "ratio": round(other / same, 2),
            }
        )
    result = {"benchmark": "resume_world_size", "preset": "124m", "rows": rows}
    save_result("resume_world_size", result)
    return result


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [2, 3])
