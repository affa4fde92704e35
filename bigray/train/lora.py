"""LoRA fine-tuning with peft: which modules get adapters, and wrapping the base model.

The base stays frozen and is never written again: a checkpoint holds the adapter (in peft's format,
artifacts/adapter.py), its optimizer state and the RNG/step, and names its base
(``base_model_name_or_path``) so anyone can rebuild it.
"""

from __future__ import annotations

import torch

from bigray.config import FinetuneMethodConfig
from bigray.models.families import lora_targets


def target_modules(cfg: FinetuneMethodConfig, model_type: str) -> list[str] | str:
    """What peft targets: the configured names, or the base's family's default (every linear layer of
    the blocks, models/families.py)."""
    return list(cfg.lora_target_modules) or lora_targets(model_type)


def apply_lora(model: torch.nn.Module, cfg: FinetuneMethodConfig, base: str) -> torch.nn.Module:
    """``model`` with frozen weights and trainable LoRA adapters (a peft PeftModel); ``base`` is
    recorded in the adapter config as where the base model lives."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=target_modules(cfg, model.config.model_type),
        task_type="CAUSAL_LM",
        fan_in_fan_out=model.config.model_type == "gpt2",
        base_model_name_or_path=base,
    )
    peft_model = get_peft_model(model, lora)
    if getattr(model, "is_gradient_checkpointing", False):
        peft_model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return peft_model
