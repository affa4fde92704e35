"""DeepSpeed decisions checked in one process (world size 1, gloo): parameter groups under ZeRO-3
partitioned construction, and the DeepSpeed config a GPU run gets."""

import pytest

from bigray.config import DeepSpeedConfig, GPTTrainConfig


def test_zero3_partitioned_model_keeps_weight_decay_on_its_matrices(tmp_path):
    from bigray.models.gpt import build_gpt, decoder_config
    from bigray.train import engine
    from bigray.train.context import LocalContext
    from bigray.train.optim import decay_groups

    LocalContext(str(tmp_path))  # a world-size-1 process group, as a one-process run has
    model_cfg = decoder_config("gpt2", "tiny", vocab_size=512)
    plain = decay_groups(build_gpt(model_cfg, seed=0), 0.1)
    config = engine.deepspeed_config(
        DeepSpeedConfig(zero_stage=3, precision="fp32"), GPTTrainConfig(), world_size=1, use_gpu=False
    )
    with engine.partitioned_construction(config):
        partitioned = build_gpt(model_cfg, seed=0)
    params = list(partitioned.parameters())
    assert params and all(p.dim() == 1 and p.numel() == 0 for p in params)  # what ZeRO-3 leaves on the module
    groups = decay_groups(partitioned, 0.1)
    assert [len(g["params"]) for g in groups] == [len(g["params"]) for g in plain]
    assert groups[0]["weight_decay"] == 0.1 and sum(p.ds_numel for p in groups[0]["params"]) == sum(
        p.numel() for p in plain[0]["params"]
    )
    # and DeepSpeed's ZeRO-3 optimizer keeps them: its first group (weight decay 0.1) holds every matrix
    zero3 = engine.initialize(partitioned, groups, config).optimizer
    assert [g["weight_decay"] for g in zero3.param_groups] == [0.1, 0.0]
    assert sum(p.ds_numel for p in zero3.fp16_groups[0]) == sum(p.numel() for p in plain[0]["params"])


def test_gpu_runs_get_bf16_fp32_gradients_and_an_optimizer_that_needs_no_compiler():
    from bigray.train.engine import deepspeed_config

    gpu = deepspeed_config(
        DeepSpeedConfig(zero_stage=2, precision="bf16"), GPTTrainConfig(), world_size=8, use_gpu=True
    )
    assert gpu["bf16"]["enabled"] and not gpu["fp16"]["enabled"]
    assert gpu["data_types"] == {"grad_accum_dtype": "fp32"} and gpu["communication_data_type"] == "fp32"
    assert gpu["optimizer"]["params"]["torch_adam"] and gpu["optimizer"]["params"]["fused"]  # torch's fused AdamW
    cpu = deepspeed_config(
        DeepSpeedConfig(zero_stage=2, precision="fp32"), GPTTrainConfig(), world_size=2, use_gpu=False
    )
    assert (
        cpu["optimizer"]["params"]["torch_adam"]
        and "fused" not in cpu["optimizer"]["params"]
        and "data_types" not in cpu
    )
    offload = deepspeed_config(
        DeepSpeedConfig(zero_stage=3, precision="bf16", offload_optimizer=True), GPTTrainConfig(), 8, True
    )
    assert "torch_adam" not in offload["optimizer"]["params"]  # offloaded steps run DeepSpeed's CPU Adam
    with pytest.raises(ValueError, match="resolved precision"):
        deepspeed_config(DeepSpeedConfig(), GPTTrainConfig(), world_size=1, use_gpu=True)


def test_auto_precision_follows_the_device(monkeypatch):
    import torch

    from bigray.cluster import training_precision

    assert DeepSpeedConfig().precision == "auto"
    assert training_precision("auto", torch.device("cpu")) == "fp32"
    assert training_precision("bf16", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # H100: bf16 tensor cores
    assert training_precision("auto", torch.device("cuda", 0)) == "bf16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # V100: fp16 only
    assert training_precision("auto", torch.device("cuda", 0)) == "fp16"
    assert training_precision("auto", torch.device("cuda", 0), fp16=False) == "fp32"  # ResNet has no fp16 path


def test_mfu_peaks_tell_gpu_variants_apart():
    from bigray.train.metrics import gpu_peak

    assert gpu_peak("NVIDIA H100 80GB HBM3", "bf16") == 989e12  # SXM
    assert gpu_peak("NVIDIA H100 PCIe", "bf16") == 756e12
    assert gpu_peak("NVIDIA H100 NVL", "bf16") == 835e12
    assert gpu_peak("NVIDIA H200", "fp32") == 495e12  # fp32 matmuls run on TF32
    assert gpu_peak("NVIDIA L40S", "bf16") == 362e12 and gpu_peak("NVIDIA L4", "bf16") == 121e12
    assert gpu_peak("NVIDIA A10G", "bf16") == 70e12 and gpu_peak("NVIDIA A10", "bf16") == 125e12
    assert gpu_peak("Tesla V100-SXM2-16GB", "fp16") == 125e12 and gpu_peak("Tesla V100-SXM2-16GB", "fp32") == 15.7e12
    assert gpu_peak("NVIDIA B200", "bf16") == 2250e12 and gpu_peak("Some Future GPU", "bf16") == 0.0


def test_cpu_matmul_peak_is_measured_once_per_machine(tmp_path, monkeypatch):
    import json

    import torch

    from bigray.train import metrics

    monkeypatch.setenv("BIGRAY_CACHE_DIR", str(tmp_path))
    metrics._cached_peak.cache_clear()
    first = metrics.peak_flops(torch.device("cpu"), "fp32")
    assert first > 1e9
    stored = json.loads((tmp_path / "matmul_peak.json").read_text())
    (key,) = stored
    assert "torch.float32" in key and stored[key] == first
    stored[key] = 123.0e9  # a later start reads the cache instead of measuring
    (tmp_path / "matmul_peak.json").write_text(json.dumps(stored))
    metrics._cached_peak.cache_clear()
    assert metrics.peak_flops(torch.device("cpu"), "fp32") == 123.0e9
    metrics._cached_peak.cache_clear()


def test_bf16_zero2_engine_accumulates_gradients_in_fp32(tmp_path):
    import torch

    from bigray.models.gpt import build_gpt, decoder_config
    from bigray.train import engine
    from bigray.train.context import LocalContext
    from bigray.train.optim import decay_groups

    LocalContext(str(tmp_path))
    model = build_gpt(decoder_config("gpt2", "tiny", vocab_size=512), seed=0)
    config = engine.deepspeed_config(
        DeepSpeedConfig(zero_stage=2, precision="bf16"), GPTTrainConfig(micro_batch_size=2), 1, False
    )
    trained = engine.initialize(model, decay_groups(model, 0.1), config)
    assert trained.optimizer.gradient_accumulation_dtype == torch.float32
    x = torch.randint(0, 512, (2, 16))
    losses = []
    for _ in range(3):
        loss = trained(input_ids=x, labels=x).loss
        trained.backward(loss)
        trained.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_deepspeed_starts_without_its_autotuners_mlflow_import_and_mlflow_still_imports_after():
    """A fresh process, as a Ray Train worker is: DeepSpeed's engine path skips the optional MLflow
    import (most of DeepSpeed's import time); a run that tracks to MLflow imports it as before."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from bigray.train.engine import import_deepspeed, skip_inference_comm_op\n"
        "import_deepspeed(); skip_inference_comm_op()\n"
        "assert 'mlflow' not in sys.modules, 'DeepSpeed imported mlflow'\n"
        "import mlflow\n"
        "print('ok', mlflow.__version__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "\nok " in "\n" + out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
