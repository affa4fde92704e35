"""GPT-2-architecture decoder models (Hugging Face transformers, SDPA attention).

Plain single-device torch: nothing here knows about Ray or DeepSpeed. Using transformers' GPT-2
means every checkpoint exports to a directory that AutoModelForCausalLM loads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GPTShape:
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int


# GPT-2 (124m-774m) and GPT-3 (1.3b, 2.7b) shapes; tiny is for tests and CI.
GPT_SHAPES: dict[str, GPTShape] = {
    "tiny": GPTShape(n_layer=2, n_head=4, n_embd=128, n_positions=256),
    "124m": GPTShape(n_layer=12, n_head=12, n_embd=768, n_positions=1024),
    "350m": GPTShape(n_layer=24, n_head=16, n_embd=1024, n_positions=1024),
    "774m": GPTShape(n_layer=36, n_head=20, n_embd=1280, n_positions=1024),
    "1.3b": GPTShape(n_layer=24, n_head=32, n_embd=2048, n_positions=2048),
    "2.7b": GPTShape(n_layer=32, n_head=32, n_embd=2560, n_positions=2048),
}


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


def build_gpt(config, seed: int | None = None) -> torch.nn.Module:
    """A freshly initialised GPT2LMHeadModel with SDPA attention (seeded for identical ranks)."""
    from transformers import AutoModelForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    # from_config (not the bare constructor) so that a partitioned-construction context set up by
    # the training side (DeepSpeed ZeRO-3) applies; the model code itself knows nothing of it.
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12*L*H*T for attention (PaLM appendix B)."""
    n_params = (
        config.vocab_size * config.n_embd
        + config.n_positions * config.n_embd
        + config.n_layer * (12 * config.n_embd**2 + 13 * config.n_embd)
    )
    return 6 * n_params + 12 * config.n_layer * config.n_embd * seq_len
