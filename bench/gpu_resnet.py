"""GPU throughput of ResNet-50 at 224x224 on synthetic data, bf16 autocast + channels_last.

Reference: NVIDIA publishes about 2,470 img/s for an A100 with AMP.
Run: python bench/gpu_resnet.py   (needs CUDA, torch and torchvision)
"""

from __future__ import annotations

import json
import time

import torch
import torchvision


def main(batch: int = 256, steps: int = 30) -> dict:
    device = torch.device("cuda")
    model = torchvision.models.resnet50(num_classes=1000).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    times = []
    for i in range(steps + 5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 5:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]
    result = {
        "model": "resnet50",
        "batch": batch,
        "images_per_s": round(batch / step),
        "gpu": torch.cuda.get_device_name(),
        "reference_a100_amp": 2470,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
