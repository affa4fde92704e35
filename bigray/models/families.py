"""The decoder families bigray pretrains, in one registry (torchtitan's ModelSpec, smaller).

A :class:`Family` names its pretraining presets (shapes), builds the transformers config of a preset,
counts training FLOPs per token, and says which Hugging Face architectures it covers (a fine-tuning
base of any of them trains with its FLOPs). Pure data and arithmetic, no torch and nothing else of
bigray: the config validates ``model.family`` and ``model.preset`` against it, models build from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class GPTShape:
    layers: int
    heads: int
    hidden: int
    positions: int


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


def _gpt2_config(s: GPTShape, vocab_size: int, dropout: float, eos_token_id: int | None) -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=s.positions,
        n_embd=s.hidden,
        n_layer=s.layers,
        n_head=s.heads,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=True,
    )


def _llama_config(s: LlamaShape, vocab_size: int, dropout: float, eos_token_id: int | None) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=s.positions,
        rope_parameters={"rope_type": "default", "rope_theta": s.rope_theta},
        rms_norm_eps=1e-5,
        attention_dropout=dropout,
        tie_word_embeddings=s.tied,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
    )


def _gpt2_flops(config: Any, seq_len: int) -> float:
    """GPT-2 counts its (tied) token embedding as the LM head, and its position table."""
    d, layers = config.hidden_size, config.num_hidden_layers
    n_params = config.vocab_size * d + int(config.max_position_embeddings) * d + layers * (12 * d**2 + 13 * d)
    return 6 * n_params + 12 * layers * d * seq_len


def _llama_flops(config: Any, seq_len: int) -> float:
    """q/o at full width, k/v at the grouped-query width, the three SwiGLU projections and the LM head;
    the token-embedding lookup is not a matmul (and norms are noise)."""
    d, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    attention = 2 * d * heads * head_dim + 2 * d * kv_heads * head_dim
    n_params = config.vocab_size * d + layers * (attention + 3 * d * config.intermediate_size)
    return 6 * n_params + 12 * layers * heads * head_dim * seq_len


@dataclass(frozen=True)
class Family:
    name: str
    presets: dict[str, Any]
    """Preset name -> shape; 'tiny' is for tests and CI."""
    make_config: Callable[[Any, int, float, int | None], Any]
    """(shape, vocab size, dropout, end-of-text id) -> the transformers config."""
    flops: Callable[[Any, int], float]
    """Training FLOPs per token of a config at a sequence length: 6N for the matmuls plus 12*L*H*T
    for attention (PaLM appendix B)."""
    model_types: tuple[str, ...]
    """The transformers ``model_type`` values this architecture covers (fine-tuning bases)."""
    lora_targets: tuple[str, ...]
    """LoRA's default modules: every linear layer of the blocks (attention and MLP), not the LM head.
    Adapters on all of them match full fine-tuning where attention alone falls short (QLoRA, Dettmers
    et al. 2023; LLaMA-Factory's ``lora_target: all``), unlike peft's own per-model default (q/v
    only, from the original LoRA paper). Named rather than peft's 'all-linear', so the checkpoint's
    adapter_config.json says which modules were adapted."""

    def config(self, preset: str, vocab_size: int, dropout: float = 0.0, eos_token_id: int | None = None) -> Any:
        """The transformers config of a pretraining preset for a tokenizer's vocabulary."""
        return self.make_config(self.presets[preset], vocab_size, dropout, eos_token_id)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "gpt2",  # learned positions, LayerNorm, GELU MLP
            {  # GPT-2 (124m-774m) and GPT-3 (1.3b, 2.7b) shapes
                "tiny": GPTShape(layers=2, heads=4, hidden=128, positions=256),
                "124m": GPTShape(layers=12, heads=12, hidden=768, positions=1024),
                "350m": GPTShape(layers=24, heads=16, hidden=1024, positions=1024),
                "774m": GPTShape(layers=36, heads=20, hidden=1280, positions=1024),
                "1.3b": GPTShape(layers=24, heads=32, hidden=2048, positions=2048),
                "2.7b": GPTShape(layers=32, heads=32, hidden=2560, positions=2048),
            },
            _gpt2_config,
            _gpt2_flops,
            ("gpt2",),
            ("c_attn", "c_proj", "c_fc"),  # Conv1D layers: qkv, both output projections, MLP in
        ),
        Family(
            "llama",  # RoPE, RMSNorm, SwiGLU, grouped-query attention: what Llama, Qwen and Mistral share
            {  # Llama 3.2 1B and Llama 3.1 8B shapes (with the tokenizer's vocabulary)
                # layers, heads, kv_heads, hidden, intermediate, positions, rope_theta, tied
                "tiny": LlamaShape(2, 4, 2, 128, 384, 256, 10_000.0, True),
                "mini": LlamaShape(4, 4, 4, 128, 384, 256, 10_000.0, True),  # jobs/configs/gpt_cpu_budget.yaml
                "1b": LlamaShape(16, 32, 8, 2048, 8192, 8192, 500_000.0, True),
                "8b": LlamaShape(32, 32, 8, 4096, 14336, 8192, 500_000.0, False),
            },
            _llama_config,
            _llama_flops,
            ("llama", "qwen2", "qwen3", "mistral"),
            ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        ),
    )
}


def lora_targets(model_type: str) -> list[str] | str:
    """LoRA's default target modules for a base model: its family's, or peft's 'all-linear' (every
    linear layer but the LM head) for an architecture no family covers."""
    family = next((f for f in FAMILIES.values() if model_type in f.model_types), None)
    return list(family.lora_targets) if family else "all-linear"


def family_of(config: Any) -> Family:
    """The family whose architecture a transformers config has (any other decoder counts as Llama-style)."""
    return next((f for f in FAMILIES.values() if config.model_type in f.model_types), FAMILIES["llama"])
