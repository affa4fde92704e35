"""The GPT model format every side reads: a Hugging Face directory (config.json, model.safetensors,
tokenizer) that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load directly.

bigray writes one into every GPT checkpoint (``model/``) and ``bigray export`` writes one; fine-tuning
reads one as a base model. Only safetensors weights are read: nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from bigray.artifacts.checkpoint import CheckpointError


def save_hf_model(state_dict: dict[str, torch.Tensor], model_cfg: Any, tokenizer_dir: str | Path, out: Path) -> None:
    """A Hugging Face model directory: config.json, model.safetensors (tied head dropped), tokenizer."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    model_cfg.architectures = ["GPT2LMHeadModel"]
    model_cfg.save_pretrained(str(out))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if k != "lm_head.weight"}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out))


def read_gpt2_config(model_dir: Path) -> Any:
    """The GPT2Config of a model directory, checked against its tokenizer; CheckpointError naming the problem."""
    from transformers import AutoTokenizer, GPT2Config

    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except ValueError as e:
        raise CheckpointError(f"{model_dir}/config.json is unreadable: {e}") from None
    if raw.get("model_type") != "gpt2":
        archs = ", ".join(raw.get("architectures") or []) or "unknown architecture"
        raise CheckpointError(
            f"{model_dir} holds a '{raw.get('model_type')}' model ({archs}); bigray fine-tunes GPT-2-architecture models"
        )
    config = GPT2Config.from_dict(raw)
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{model_dir} has no usable tokenizer (the base model's tokenizer is kept): {e}") from None
    if len(tok) > config.vocab_size:
        raise CheckpointError(
            f"{model_dir}: the tokenizer has {len(tok)} tokens but the model's vocabulary (vocab_size) has "
            f"{config.vocab_size}; the tokenizer does not belong to this model"
        )
    return config


def load_hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a model directory's ``*.safetensors`` files, named as GPT2LMHeadModel names them."""
    from safetensors.torch import load_file

    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise CheckpointError(f"{model_dir} has no *.safetensors weights (pickled .bin weights are not loaded)")
    state: dict[str, torch.Tensor] = {}
    for w in weights:
        state.update(load_file(str(w)))
    # Hugging Face's own GPT-2 files name the base model's weights without the "transformer." prefix.
    return {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v.float() for k, v in state.items()}
