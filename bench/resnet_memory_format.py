"""ResNet-18 (small stem) training step, NCHW vs channels_last, in one process with one thread (what
each of the 2 DDP workers has): the model, batch, optimizer and autocast the trainer uses. The two
layouts alternate, several rounds, so the machine's drift hits both; median images/s per layout.
Run: python bench/resnet_memory_format.py [bf16|fp32] [rounds]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F
from common import save_result

from bigray.models.resnet import build_resnet


def images_per_s(channels_last: bool, bf16: bool, batch: int = 64, steps: int = 20, warmup: int = 3) -> float:
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_resnet("resnet18", 10, 1, small_input_stem=True).to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times[warmup:])


def main(precision: str = "bf16", rounds: int = 4) -> dict:
    torch.set_num_threads(1)
    runs: dict[str, list[float]] = {"nchw": [], "channels_last": []}
    for _ in range(rounds):
        for name in runs:
            runs[name].append(round(images_per_s(name == "channels_last", precision == "bf16"), 1))
    nchw, cl = statistics.median(runs["nchw"]), statistics.median(runs["channels_last"])
    result = {
        "benchmark": "resnet_memory_format",
        "precision": precision,
        "batch": 64,
        "threads": 1,
        "runs": runs,
        "images_per_s_nchw": nchw,
        "images_per_s_channels_last": cl,
        "ratio": round(cl / nchw, 3),
    }
    save_result(f"resnet_memory_format_{precision}", result)
    return result


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bf16", int(sys.argv[2]) if len(sys.argv) > 2 else 4)
