"""Decoder-only language models (Hugging Face transformers, SDPA attention): GPT-2 and Llama shapes.

Plain single-device torch: nothing here knows about Ray or DeepSpeed. Every model is one that
transformers' ``AutoModelForCausalLM`` builds from its config, so every checkpoint exports to a
directory that transformers (and vLLM) load; fine-tuning takes any such decoder as its base (GPT-2,
Llama, Qwen2/Qwen3, Mistral, ...). The families and their presets are in families.py.
"""

from __future__ import annotations

from typing import Any

import torch

from bigray.models.families import FAMILIES, family_of


def decoder_config(
    family: str, preset: str, vocab_size: int, dropout: float = 0.0, eos_token_id: int | None = None
) -> Any:
    """The transformers config of a family's pretraining preset for a tokenizer's vocabulary."""
    return FAMILIES[family].config(preset, vocab_size, dropout, eos_token_id)


DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout", "dropout")
"""The dropout fields of the decoder configs transformers ships (GPT-2's three; Llama/Qwen/Mistral's one)."""


def with_dropout(config: Any, dropout: float) -> Any:
    """A copy of ``config`` with every dropout field it has set to ``dropout``."""
    config = config.__class__.from_dict(config.to_dict())
    for key in DROPOUT_KEYS:
        if hasattr(config, key) and isinstance(getattr(config, key), float):
            setattr(config, key, dropout)
    return config


def build_gpt(config: Any, seed: int | None = None) -> torch.nn.Module:
    """A freshly initialised causal LM of this config with SDPA attention (seeded for identical ranks)."""
    from transformers import AutoModelForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    # from_config (not the bare constructor) so that a partitioned-construction context set up by
    # the training side (DeepSpeed ZeRO-3) applies; the model code itself knows nothing of it.
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")


def context_length(config: Any) -> int:
    """The positions a model has (GPT-2's n_positions is max_position_embeddings through its attribute map)."""
    return int(config.max_position_embeddings)


def shape(config: Any) -> list[int]:
    """(layers, heads, width, vocab): what a checkpoint must share with a run that resumes it."""
    return [config.num_hidden_layers, config.num_attention_heads, config.hidden_size, config.vocab_size]


def flops_per_token(config: Any, seq_len: int) -> float:
    """Training FLOPs per token of a model at a sequence length, as its family counts them."""
    return family_of(config).flops(config, seq_len)
