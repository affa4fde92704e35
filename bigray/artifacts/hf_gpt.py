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


def vllm_problems(model_dir: str | Path) -> list[str]:
    """What would stop vLLM's GPT-2 loader (``GPT2LMHeadModel``, as Ray Serve LLM runs it) from
    serving this Hugging Face directory; empty when nothing would. Checked: the config's
    architecture and the options vLLM's GPT-2 asserts off, every weight it loads with the shape it
    expects (HF's Conv1D layout, which vLLM transposes), safetensors only, and a tokenizer that
    loads and fits the vocabulary. Not checked here: anything needing vLLM itself or a GPU."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        return [f"{model_dir}/config.json is unreadable: {e}"]
    problems = []
    if raw.get("model_type") != "gpt2" or "GPT2LMHeadModel" not in (raw.get("architectures") or []):
        problems.append(f"config.json: model_type {raw.get('model_type')!r}, architectures {raw.get('architectures')}: vLLM needs gpt2 / GPT2LMHeadModel")
    for flag in ("add_cross_attention", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if raw.get(flag):
            problems.append(f"config.json: {flag} is set; vLLM's GPT-2 does not support it")
    d, layers, vocab, positions = raw.get("n_embd"), raw.get("n_layer"), raw.get("vocab_size"), raw.get("n_positions")
    if not all(isinstance(v, int) and v > 0 for v in (d, layers, vocab, positions)):
        return problems + ["config.json: n_embd, n_layer, vocab_size and n_positions must be positive integers"]
    inner = raw.get("n_inner") or 4 * d
    expected = {"wte.weight": (vocab, d), "wpe.weight": (positions, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(layers):
        for name, shape in {"ln_1.weight": (d,), "ln_1.bias": (d,), "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
                            "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
                            "mlp.c_fc.weight": (d, inner), "mlp.c_fc.bias": (inner,), "mlp.c_proj.weight": (inner, d),
                            "mlp.c_proj.bias": (d,)}.items():  # fmt: skip
            expected[f"h.{i}.{name}"] = shape
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        problems.append(f"{model_dir} has no *.safetensors weights")
    found: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), "pt") as weights:
            for key in weights.keys():
                found[key.removeprefix("transformer.")] = tuple(weights.get_slice(key).get_shape())
    for name, shape in expected.items():
        if files and found.get(name) != shape:
            problems.append(f"weight {name}: {'missing' if name not in found else f'shape {found[name]}'}, vLLM expects {shape}")
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        if len(tok) > vocab:
            problems.append(f"the tokenizer has {len(tok)} tokens, more than vocab_size {vocab}")
    except (OSError, ValueError) as e:
        problems.append(f"the tokenizer does not load: {e}")
    return problems
