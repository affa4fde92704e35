"""GPU throughput of the GPT model at world size 1 (for a lent H200): 124m and 350m in bf16.

Plain torch (no Ray, no DeepSpeed: the GPU box has neither): bigray's model, bf16 autocast,
fused AdamW, the same FLOPs-per-token formula and GPU peak table as training. Prints tokens/s
and MFU per preset.
Run: python bench/gpu_gpt.py   (needs CUDA, torch and transformers)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bigray.models.gpt import build_gpt, decoder_config, flops_per_token  # noqa: E402
from bigray.train.metrics import peak_flops  # noqa: E402

ANCHOR_MFU = 0.40
"""What torchtitan and llm-foundry report for GPT-class models in bf16 on H100s (~40% MFU)."""


def measure(preset: str, micro_batch: int, block: int = 1024, steps: int = 20, vocab: int = 50304) -> dict:
    device = torch.device("cuda")
    cfg = decoder_config("gpt2", preset, vocab)
    model = build_gpt(cfg, seed=0).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    compiled = torch.compile(model)
    x = torch.randint(0, vocab, (micro_batch, block + 1), device=device)
    times = []
    for i in range(steps + 3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = compiled(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]
    tokens_per_s = micro_batch * block / step
    achieved = flops_per_token(cfg, block) * tokens_per_s
    peak = peak_flops(device, "bf16")
    return {
        "preset": preset,
        "micro_batch": micro_batch,
        "block": block,
        "tokens_per_s": round(tokens_per_s),
        "tflops": round(achieved / 1e12, 1),
        "mfu": round(achieved / peak, 3) if peak else None,
        "gpu": torch.cuda.get_device_name(),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
        "anchor_mfu": ANCHOR_MFU,
        "vs_anchor": round(achieved / peak / ANCHOR_MFU, 2) if peak else None,
    }


if __name__ == "__main__":
    for preset, mb in (("124m", 32), ("350m", 16)):
        print(json.dumps(measure(preset, mb)), flush=True)
