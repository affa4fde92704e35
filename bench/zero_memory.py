"""ZeRO memory: per-rank bytes of parameters, gradients and optimizer state for stages 0-3.

Two Ray Train workers train the 124m GPT preset for two steps under each stage; each rank then
counts the bytes of every tensor DeepSpeed holds for it (deduplicated by storage) and its peak RSS.
Prints a table and the stage-3 / stage-0 ratio (target <= 0.55).
Run: python bench/zero_memory.py
"""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch
from common import CONFIGS, save_result, scratch

from bigray.config import GPTPretrainConfig, from_dict, load_config, to_dict
from bigray.recipes.gpt import PRETRAIN


def _tensors(obj, depth=0):
    """Tensors reachable from an optimizer wrapper's attributes (two levels of lists/dicts)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 3 and isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, depth + 1)
    elif depth < 3 and isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, depth + 1)


def state_bytes(engine) -> dict[str, int]:
    seen: set[int] = set()
    totals = {"params": 0, "grads": 0, "optimizer": 0}

    def add(kind, t):
        if t is None or t.numel() == 0:
            return
        key = t.untyped_storage().data_ptr()
        if key in seen:
            return
        seen.add(key)
        totals[kind] += t.untyped_storage().nbytes()

    for p in engine.module.parameters():
        add("params", getattr(p, "ds_tensor", p.data))
        add("grads", p.grad)
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    for state in inner.state.values():
        for t in _tensors(state):
            add("optimizer", t)
    for name, value in vars(opt).items():
        if value is inner:
            continue
        kind = "grads" if "grad" in name else "optimizer" if ("fp32" in name or "master" in name) else "params"
        for t in _tensors(value):
            add(kind, t)
    return totals


def loop(config):
    import ray.train

    from bigray.train.context import RayContext
    from bigray.train.gpt import GPTTrainer

    cfg = from_dict(GPTPretrainConfig, config["job"])
    ctx = RayContext()
    trainer = GPTTrainer(cfg, ctx, config["data_dir"])
    trainer.train_step()  # optimizer states exist from the first step on
    # Measure at the peak of a step: gradients computed, optimizer not yet stepped.
    trainer.engine.backward(trainer._loss(*trainer._batch(trainer.train_windows, 1, shuffle=True)))
    row = {
        "rank": ctx.rank,
        **state_bytes(trainer.engine),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    trainer.engine.step()
    name = f"{cfg.deepspeed.precision}_stage{cfg.deepspeed.zero_stage}_rank{ctx.rank}.json"
    Path(config["out"], name).write_text(json.dumps(row))
    ray.train.report({"done": 1})


def main(preset: str = "124m") -> dict:
    import sys

    import ray
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    tmp = scratch("zero-memory")
    gib = 1 << 30
    result = {
        "benchmark": "zero_memory",
        "preset": preset,
        "workers": 2,
        "measured": "after backward, before the optimizer step",
    }
    for precision in ("fp32", "bf16"):
        table = {}
        for stage in (0, 1, 2, 3):
            cfg = load_config(
                GPTPretrainConfig,
                CONFIGS / "gpt_tiny.yaml",
                [
                    f"model.preset={preset}",
                    "model.block_size=128",
                    "train.micro_batch_size=1",
                    f"deepspeed.zero_stage={stage}",
                    f"deepspeed.precision={precision}",
                    "scaling.num_workers=2",
                    f"run.storage_path={tmp}",
                    f"run.name={precision}-stage{stage}",
                ],
            )
            job = PRETRAIN.prepare(cfg)
            TorchTrainer(
                loop,
                train_loop_config={"job": to_dict(job.config), "data_dir": job.data_dir, "out": str(tmp)},
                scaling_config=ray.train.ScalingConfig(num_workers=2),
                run_config=ray.train.RunConfig(name=f"{precision}-stage{stage}", storage_path=str(tmp)),
            ).fit()
            ranks = [json.loads((tmp / f"{precision}_stage{stage}_rank{r}.json").read_text()) for r in range(2)]
            r0 = ranks[0]
            table[stage] = {k: r0[k] for k in ("params", "grads", "optimizer", "peak_rss")}
            table[stage]["total"] = r0["params"] + r0["grads"] + r0["optimizer"]
        print(f"\nZeRO per-rank state, GPT {preset}, {precision}, 2 workers (GiB; after backward, before step)")
        print(f"{'stage':>5} {'params':>8} {'grads':>8} {'optim':>8} {'total':>8} {'x stage0':>9} {'peak RSS':>9}")
        for stage, row in table.items():
            ratio = row["total"] / table[0]["total"]
            print(
                f"{stage:>5} {row['params'] / gib:8.3f} {row['grads'] / gib:8.3f} {row['optimizer'] / gib:8.3f} {row['total'] / gib:8.3f} {ratio:9.3f} {row['peak_rss'] / gib:9.2f}"
            )
        result[precision] = {
            "per_rank_bytes": table,
            "stage3_over_stage0": round(table[3]["total"] / table[0]["total"], 3),
        }
    save_result("zero_memory", result)
    ray.shutdown()
    return result


if __name__ == "__main__":
    import sys

    main(*sys.argv[1:])
