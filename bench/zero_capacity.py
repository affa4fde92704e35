"""What ZeRO buys on one machine: the largest GPT preset 2 workers can train under each strategy.

For each strategy (ZeRO-0; ZeRO-3; ZeRO-3 with CPU offload; ZeRO-3 with NVMe offload on request)
the presets are tried from small to large, each attempt in its own process with its own local Ray,
until one fails. An attempt builds the model on 2 Ray Train workers, trains 3 steps (micro batch
1, block 128, bf16, GPT-2's 50,257-token vocabulary) and reports each worker's peak RSS (and its
RSS after setup and after each step), the bytes DeepSpeed holds for it, and the machine's peak
used memory. A failure (Ray's out-of-memory killer, the kernel's, or any error) is recorded with
its message.
Run: python bench/zero_capacity.py [strategies...] [presets...]
     (default: zero0 zero3 zero3_offload over 350m 774m 1.3b; `zero3_nvme 1.3b` tries ZeRO-Infinity)
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import CONFIGS, REPO, save_result, scratch

STRATEGIES = {
    "zero0": ["deepspeed.zero_stage=0"],
    "zero3": ["deepspeed.zero_stage=3"],
    "zero3_offload": ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true", "deepspeed.offload_params=true"],
    # ZeRO-Infinity: fp32 master weights and Adam states in files on disk (needs libaio: apt-get install libaio-dev).
    "zero3_nvme": ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true", "deepspeed.offload_device=nvme"],
}
DEFAULT_STRATEGIES = ["zero0", "zero3", "zero3_offload"]
STEPS = 3
# glibc keeps freed mid-sized blocks (a layer's weights, optimizer temporaries) in its heap, which
# cost 1.5 GB per worker at 350m; a fixed mmap threshold returns them to the system. Every
# strategy runs with it (Ray's processes inherit it from the attempt process that starts Ray).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def loop(config):
    import psutil
    import ray.train
    from zero_memory import state_bytes

    from bigray.config import GPTPretrainConfig, from_dict
    from bigray.train.context import RayContext
    from bigray.train.gpt import GPTTrainer

    cfg = from_dict(GPTPretrainConfig, config["job"])
    ctx = RayContext()
    me = psutil.Process()
    phases = {"start": me.memory_info().rss}
    t0 = time.perf_counter()
    trainer = GPTTrainer(cfg, ctx, config["data_dir"])
    setup_s = time.perf_counter() - t0
    phases["after_setup"] = me.memory_info().rss
    losses, times = [], []
    for i in range(STEPS):
        m = trainer.train_step()
        losses.append(m["train/loss"])
        times.append(m["train/step_time_s"])
        phases[f"after_step_{i + 1}"] = me.memory_info().rss
    row = {
        "rank": ctx.rank,
        "params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainer.engine.module.parameters()),
        "state_bytes": state_bytes(trainer.engine),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_bytes_by_phase": phases,
        "setup_s": round(setup_s, 1),
        "step_s": [round(t, 2) for t in times],
        "loss": losses,
    }
    Path(config["out"], f"rank{ctx.rank}.json").write_text(json.dumps(row))
    ray.train.report({"loss": losses[-1]})


def attempt(strategy: str, preset: str, out: str) -> None:
    """One (strategy, preset) run on a fresh local Ray; writes out/result.json."""
    import psutil
    import ray
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer

    from bigray.config import GPTPretrainConfig, load_config, to_dict
    from bigray.recipes.gpt import PRETRAIN

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    overrides = [
        f"model.preset={preset}",
        "model.block_size=128",
        "train.micro_batch_size=1",
        "train.warmup_steps=1",
        "data.tokenizer=gpt2",
        f"data.cache_dir={REPO}/data",
        "deepspeed.precision=bf16",
        "scaling.num_workers=2",
        *STRATEGIES[strategy],
        *([f"deepspeed.nvme_path={out}/nvme"] if "nvme" in strategy else []),
    ]
    cfg = load_config(GPTPretrainConfig, CONFIGS / "gpt_tiny.yaml", overrides)
    job = PRETRAIN.prepare(cfg)
    peak = {"used": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            peak["used"] = max(peak["used"], psutil.virtual_memory().total - psutil.virtual_memory().available)

    threading.Thread(target=sample, daemon=True).start()
    ray.init(num_cpus=2, include_dashboard=True, runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}})
    t0 = time.time()
    result = {"strategy": strategy, "preset": preset}
    try:
        TorchTrainer(
            loop,
            train_loop_config={"job": to_dict(job.config), "data_dir": job.data_dir, "out": out},
            scaling_config=ray.train.ScalingConfig(num_workers=2),
            run_config=ray.train.RunConfig(name=f"{strategy}-{preset}", storage_path=out),
        ).fit()
        result["ok"] = True
        result["ranks"] = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    except Exception as e:  # noqa: BLE001 - any failure is the measurement
        result["ok"] = False
        text = " ".join(str(e).split())
        # Ray's out-of-memory killer says how full the node was
        oom = re.search(r"Memory on the node .*? limit \([0-9.]+\)", text)
        result["error"] = ("out of memory: " + oom.group(0)) if oom else text[-600:]
    done.set()
    result["wall_s"] = round(time.time() - t0, 1)
    result["machine_peak_used_bytes"] = peak["used"]
    Path(out, "result.json").write_text(json.dumps(result))
    ray.shutdown()


def main(presets: list[str], strategies: list[str]) -> dict:
    gib = 1 << 30
    tmp = scratch("zero-capacity")
    rows = []
    for strategy in strategies:
        for preset in presets:
            out = tmp / f"{strategy}-{preset}"
            out.mkdir()
            print(f"--- {strategy} {preset}", flush=True)
            proc = subprocess.run(
                [sys.executable, __file__, "--attempt", strategy, preset, str(out)],
                env={**os.environ, **MALLOC_ENV},
                timeout=1800,
            )
            result_file = out / "result.json"
            if result_file.exists():
                row = json.loads(result_file.read_text())
            else:
                row = {
                    "strategy": strategy,
                    "preset": preset,
                    "ok": False,
                    "error": f"attempt process exited {proc.returncode}",
                }
            rows.append(row)
            if row["ok"]:
                rss = [r["peak_rss_bytes"] / gib for r in row["ranks"]]
                held = [sum(r["state_bytes"].values()) / gib for r in row["ranks"]]
                print(
                    f"{strategy:14} {preset:5} OK    peak RSS/worker {max(rss):5.1f} GiB  DeepSpeed state/worker "
                    f"{max(held):5.2f} GiB  machine peak {row['machine_peak_used_bytes'] / gib:5.1f} GiB  "
                    f"step {row['ranks'][0]['step_s'][-1]:.1f} s  loss {row['ranks'][0]['loss']}",
                    flush=True,
                )
            else:
                print(f"{strategy:14} {preset:5} FAILED {row['error'][-300:]}", flush=True)
                break
    largest = {
        s: max((r["preset"] for r in rows if r["strategy"] == s and r["ok"]), key=presets.index, default=None)
        for s in strategies
    }
    print("largest preset that trains:", largest)
    result = {"benchmark": "zero_capacity", "workers": 2, "steps": STEPS, "largest": largest, "attempts": rows}
    save_result(
        "zero_capacity" if strategies == DEFAULT_STRATEGIES else "zero_capacity_" + "_".join(strategies), result
    )
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["--attempt"]:
        attempt(*sys.argv[2:5])
    else:
        args = sys.argv[1:]
        chosen = [a for a in args if a in STRATEGIES] or DEFAULT_STRATEGIES
        main([a for a in args if a not in STRATEGIES] or ["350m", "774m", "1.3b"], chosen)
