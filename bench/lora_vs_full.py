"""LoRA vs full fine-tuning of the same base: trainable parameters, per-rank memory, step time.

The base is a Llama-shaped decoder saved as a Hugging Face directory (random weights, hidden 512,
8 layers, 8 query / 4 KV heads, the corpus's 8192-token BPE: ~30M parameters), fine-tuned on chat
rows by two Ray Train workers under ZeRO-2 (fp32), once fully and once with LoRA (rank 16,
every linear layer). Each rank counts the bytes DeepSpeed holds for it after a backward (before
the step: the peak of a step) and its peak RSS; step time is the median of 20 steps after 3.
Run: python bench/lora_vs_full.py
"""

from __future__ import annotations

import json
import resource
import statistics
from pathlib import Path

import numpy as np
from common import CONFIGS, save_result, scratch
from zero_memory import state_bytes

from bigray.config import GPTFinetuneConfig, TextDataConfig, from_dict, load_config, to_dict
from bigray.recipes.gpt import FINETUNE

STEPS, WARMUP = 20, 3


def loop(config):
    import ray.train

    from bigray.train.context import RayContext
    from bigray.train.gpt import GPTTrainer

    cfg = from_dict(GPTFinetuneConfig, config["job"])
    ctx = RayContext()
    trainer = GPTTrainer(cfg, ctx, config["data_dir"])
    times = [trainer.train_step()["train/step_time_s"] for _ in range(STEPS + WARMUP)][WARMUP:]
    trainer.engine.backward(trainer._loss(*trainer._batch(trainer.train_windows, 1, shuffle=True)))
    params = list(trainer.engine.module.parameters())
    row = {
        "rank": ctx.rank,
        **state_bytes(trainer.engine),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "step_s": statistics.median(times),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "total_params": sum(p.numel() for p in params),
    }
    trainer.engine.step()
    Path(config["out"], f"{cfg.finetune.method}_rank{ctx.rank}.json").write_text(json.dumps(row))
    ray.train.report({"done": 1})


def base_model(out: Path, tokenizer_dir: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def chat_rows(path: Path, n: int = 2000, max_exchanges: int = 8) -> Path:
    """Conversations of 1 to ``max_exchanges`` exchanges (so of very different lengths, as real chat data is)."""
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(n):
            messages = []
            for _ in range(int(rng.integers(1, max_exchanges + 1))):
                a, b = (int(v) for v in rng.integers(10, 1000, size=2))
                messages += [
                    {"role": "user", "content": f"What is {a} plus {b}?"},
                    {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
                ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def main() -> dict:
    import sys

    import ray
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer

    from bigray.data.text import prepare_text

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    tmp = scratch("lora-vs-full")
    text, _ = prepare_text(TextDataConfig(cache_dir=str(tmp / "text"), max_chars=2_000_000))
    base = base_model(tmp / "base", text.tokenizer_dir)
    rows = chat_rows(tmp / "chat.jsonl")
    table = {}
    for method in ("full", "lora"):
        cfg = load_config(
            GPTFinetuneConfig,
            CONFIGS / "gpt_finetune.yaml",
            [
                f"init_from={base}",
                "data.format=chat",
                f"data.train_files=[{rows}]",
                f"data.cache_dir={tmp}/data",
                "model.block_size=256",
                "train.micro_batch_size=4",
                "deepspeed.zero_stage=2",
                "deepspeed.precision=fp32",
                f"finetune.method={method}",
                "finetune.lora_rank=16",
                "finetune.lora_alpha=32",
                "scaling.num_workers=2",
                f"run.storage_path={tmp}/runs",
                f"run.name={method}",
            ],
        )
        job = FINETUNE.prepare(cfg)
        TorchTrainer(
            loop,
            train_loop_config={"job": to_dict(job.config), "data_dir": job.data_dir, "out": str(tmp)},
            scaling_config=ray.train.ScalingConfig(num_workers=2),
            run_config=ray.train.RunConfig(name=method, storage_path=str(tmp / "ray")),
        ).fit()
        table[method] = json.loads((tmp / f"{method}_rank0.json").read_text())
    mib = 1 << 20
    print("\nLoRA vs full fine-tuning, Llama-shaped base, 2 workers, ZeRO-2 fp32 (rank 0)")
    print(
        f"{'method':>6} {'trainable':>12} {'of total':>9} {'params MiB':>11} {'grads MiB':>10} {'optim MiB':>10} {'peak RSS MiB':>13} {'step s':>7}"
    )
    for method, r in table.items():
        print(
            f"{method:>6} {r['trainable']:>12,} {r['trainable'] / r['total_params']:9.4f} {r['params'] / mib:11.1f} {r['grads'] / mib:10.1f} "
            f"{r['optimizer'] / mib:10.1f} {r['peak_rss'] / mib:13.0f} {r['step_s']:7.3f}"
        )
    full, lora = table["full"], table["lora"]
    state = lambda r: r["params"] + r["grads"] + r["optimizer"]  # noqa: E731
    result = {
        "benchmark": "lora_vs_full",
        "base_params": full["total_params"],
        "per_rank": table,
        "lora_over_full": {
            "trainable": round(lora["trainable"] / full["trainable"], 4),
            "state_bytes": round(state(lora) / state(full), 3),
            "peak_rss": round(lora["peak_rss"] / full["peak_rss"], 3),
            "step_time": round(lora["step_s"] / full["step_s"], 3),
        },
    }
    save_result("lora_vs_full", result)
    ray.shutdown()
    return result


if __name__ == "__main__":
    main()
