"""LoRA fine-tuning with peft: which modules get adapters, and wrapping the base model.

The base stays frozen and is never written again: a checkpoint holds the adapter (in peft's format,
artifacts/adapter.py), its optimizer state and the RNG/step, and names its base
(``base_model_name_or_path``) so anyone can rebuild it.
"""

from __future__ import annotations

from typing import Any

import torch

from bigray.config import ConfigError, FinetuneMethodConfig


def target_modules(cfg: FinetuneMethodConfig) -> list[str] | str:
    """What peft targets: the configured names, or every linear layer but the LM head."""
    return list(cfg.lora_target_modules) or "all-linear"


def check_targets(cfg: FinetuneMethodConfig, model_config: Any) -> None:
    """Refuse target modules the model does not have, or that are not linear layers, naming them
    (on the driver, before any worker starts: the model is built on the meta device, no weights)."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    if not cfg.lora_target_modules:
        return
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    modules = dict(model.named_modules())
    for target in cfg.lora_target_modules:
        matches = [m for name, m in modules.items() if name == target or name.endswith(f".{target}")]
        if not matches:
            leaves = sorted({name.rsplit(".", 1)[-1] for name, m in modules.items() if isinstance(m, (torch.nn.Linear, Conv1D))})
            raise ConfigError("finetune.lora_target_modules", f"the {model_config.model_type} model has no module {target!r}; its linear layers: {', '.join(leaves)}")
        if not all(isinstance(m, (torch.nn.Linear, Conv1D)) for m in matches):
            raise ConfigError("finetune.lora_target_modules", f"{target!r} is a {type(matches[0]).__name__}, not a linear layer: LoRA adapts linear layers")


def apply_lora(model: torch.nn.Module, cfg: FinetuneMethodConfig, base: str) -> torch.nn.Module:
    """``model`` with frozen weights and trainable LoRA adapters (a peft PeftModel); ``base`` is
    recorded in the adapter config as where the base model lives."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=target_modules(cfg),
        task_type="CAUSAL_LM", fan_in_fan_out=model.config.model_type == "gpt2", base_model_name_or_path=base,
    )  # fmt: skip
    peft_model = get_peft_model(model, lora)
    if getattr(model, "is_gradient_checkpointing", False):
        peft_model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return peft_model
