"""Decoder-only language models (Hugging Face transformers, SDPA attention): GPT-2 and Llama shapes.

Plain single-device torch: nothing here knows about Ray or DeepSpeed. Every model is one that
transformers' ``AutoModelForCausalLM`` builds from its config, so every checkpoint exports to a
directory that transformers (and vLLM) load; fine-tuning takes any such decoder as its base (GPT-2,
Llama, Qwen2/Qwen3, Mistral, ...). The ``family`` names which config class a preset fills in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bigray.config import MODEL_PRESETS


@dataclass(frozen=True)
class GPTShape:
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int


@dataclass(frozen=True)
class LlamaShape:
    """A Llama-style decoder: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention (kv_heads < heads)."""

    layers: int
    heads: int
    kv_heads: int
    hidden: int
    intermediate: int
    positions: int
    rope_theta: float
    tied: bool


# GPT-2 (124m-774m) and GPT-3 (1.3b, 2.7b) shapes; tiny is for tests and CI.
GPT_SHAPES: dict[str, GPTShape] = {
    "tiny": GPTShape(n_layer=2, n_head=4, n_embd=128, n_positions=256),
    "124m": GPTShape(n_layer=12, n_head=12, n_embd=768, n_positions=1024),
    "350m": GPTShape(n_layer=24, n_head=16, n_embd=1024, n_positions=1024),
    "774m": GPTShape(n_layer=36, n_head=20, n_embd=1280, n_positions=1024),
    "1.3b": GPTShape(n_layer=24, n_head=32, n_embd=2048, n_positions=2048),
    "2.7b": GPTShape(n_layer=32, n_head=32, n_embd=2560, n_positions=2048),
}

# Llama 3.2 1B and Llama 3.1 8B shapes (with the tokenizer's vocabulary); tiny is for tests and CI.
LLAMA_SHAPES: dict[str, LlamaShape] = {
    "tiny": LlamaShape(layers=2, heads=4, kv_heads=2, hidden=128, intermediate=384, positions=256, rope_theta=10_000.0, tied=True),
    "1b": LlamaShape(layers=16, heads=32, kv_heads=8, hidden=2048, intermediate=8192, positions=8192, rope_theta=500_000.0, tied=True),
    "8b": LlamaShape(layers=32, heads=32, kv_heads=8, hidden=4096, intermediate=14336, positions=8192, rope_theta=500_000.0, tied=False),
}

assert {"gpt2": tuple(GPT_SHAPES), "llama": tuple(LLAMA_SHAPES)} == MODEL_PRESETS, "config.MODEL_PRESETS names these shapes"


def decoder_config(family: str, preset: str, vocab_size: int, dropout: float = 0.0, eos_token_id: int | None = None) -> Any:
    """The transformers config of a pretraining preset for a tokenizer's vocabulary."""
    if family == "llama":
        from transformers import LlamaConfig

        s = LLAMA_SHAPES[preset]
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
            num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, max_position_embeddings=s.positions,
            rope_parameters={"rope_type": "default", "rope_theta": s.rope_theta}, rms_norm_eps=1e-5,
            attention_dropout=dropout, tie_word_embeddings=s.tied, bos_token_id=eos_token_id, eos_token_id=eos_token_id,
        )  # fmt: skip
    return gpt_config(preset, vocab_size, dropout, eos_token_id)


def gpt_config(preset: str, vocab_size: int, dropout: float = 0.0, eos_token_id: int | None = None):
    """The transformers GPT2Config for a preset and a tokenizer's vocabulary."""
    from transformers import GPT2Config

    s = GPT_SHAPES[preset]
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=s.n_positions,
        n_embd=s.n_embd,
        n_layer=s.n_layer,
        n_head=s.n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=True,
    )


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
    """Training FLOPs per token: 6N for the matmuls plus 12*L*H*T for attention (PaLM appendix B).

    GPT-2 counts its (tied) token embedding as the LM head, and its position table, as before. Llama-
    style decoders count q/o at full width, k/v at the grouped-query width, the three SwiGLU
    projections and the LM head; the token-embedding lookup is not a matmul (and norms are noise).
    """
    d, layers = config.hidden_size, config.num_hidden_layers
    if config.model_type == "gpt2":
        n_params = config.vocab_size * d + context_length(config) * d + layers * (12 * d**2 + 13 * d)
        return 6 * n_params + 12 * layers * d * seq_len
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    attention = 2 * d * heads * head_dim + 2 * d * kv_heads * head_dim
    mlp = 3 * d * config.intermediate_size
    n_params = config.vocab_size * d + layers * (attention + mlp)
    return 6 * n_params + 12 * layers * heads * head_dim * seq_len
