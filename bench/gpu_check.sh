#!/usr/bin/env bash
# The GPU check for a lent machine with one GPU and torch (+ torchvision) but no Ray or DeepSpeed:
# bigray's GPT 124m and 350m in bf16 and ResNet-50 at world size 1, in under 5 minutes, each line
# printed against its published anchor (GPT: ~40% MFU, what torchtitan and llm-foundry report for
# GPT-class models on H100; ResNet-50: NVIDIA's AMP training img/s).
#   bash bench/gpu_check.sh        (prepare the wheels here first: make gpu-wheels)
# Carry .whl/ (transformers and its small pure-Python dependencies, ~20 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python -m pip install -q --no-deps .whl/*.whl
fi
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('gpu:', torch.cuda.get_device_name(), 'torch', torch.__version__)"
timeout 200 python bench/gpu_gpt.py
timeout 80 python bench/gpu_resnet.py
