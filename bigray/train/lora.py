"""LoRA fine-tuning with peft: which modules get adapters, and wrapping the base model.

The base stays frozen and is never written again: a checkpoint holds the adapter (in peft's format,
artifacts/adapter.py), its optimizer state and the RNG/step, and names its base
(``base_model_name_or_path``) so anyone can rebuild it.
"""

from __future__ import annotations

import torch

from bigray.config import FinetuneMethodConfig


def target_modules(cfg: FinetuneMethodConfig) -> list[str] | str:
    """What peft targets: the configured names, or every linear layer but the LM head."""
    return list(cfg.lora_target_modules) or "all-linear"


def apply_lora(model: torch.nn.Module, cfg: FinetuneMethodConfig, base: str) -> torch.nn.Module:
    """``model`` with frozen weights and trainable LoRA adapters (a peft PeftModel); ``base`` is
    recorded in the adapter config as where the base model lives."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=target_modules(cfg),
        task_type="CAUSAL_LM",
        fan_in_fan_out=model.config.model_type == "gpt2",
        base_model_name_or_path=base,
    )
    peft_model = get_peft_model(model, lora)
    if getattr(model, "is_gradient_checkpointing", False):
        peft_model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return peft_model
