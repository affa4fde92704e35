"""The base model of a fine-tuning run: a bigray GPT checkpoint or a Hugging Face GPT-2 directory.

Both are checked before any training starts (architecture, vocabulary vs tokenizer, weights
format) and give the same weights: a bigray checkpoint contributes its fp32 master weights rebuilt
from every rank's ZeRO shard, exactly what ``bigray export`` writes. Only safetensors weights are
read, so nothing is unpickled from a directory someone handed you.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bigray.checkpoint import CheckpointError, read_meta
from bigray.train.deepspeed import load_full_weights

log = logging.getLogger(__name__)


@dataclass
class PretrainedGPT:
    path: Path
    """The checkpoint or Hugging Face directory the weights come from."""
    model_dir: Path
    """Directory holding config.json and the tokenizer (``<checkpoint>/model`` for a bigray checkpoint)."""
    meta: dict[str, Any] | None
    """bigray.json of a bigray checkpoint; None for a Hugging Face directory."""
    config: Any
    """The transformers GPT2Config."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.meta is not None:
            from bigray.export import consolidated_state_dict

            return consolidated_state_dict(self.path, self.meta)
        from safetensors.torch import load_file

        weights = sorted(self.model_dir.glob("*.safetensors"))
        if not weights:
            raise CheckpointError(f"{self.model_dir} has no *.safetensors weights (pickled .bin weights are not loaded)")
        state: dict[str, torch.Tensor] = {}
        for w in weights:
            state.update(load_file(str(w)))
        # Hugging Face's own GPT-2 files name the base model's weights without the "transformer." prefix.
        return {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v.float() for k, v in state.items()}

    def build(self, dropout: float) -> torch.nn.Module:
        """A GPT2LMHeadModel with these weights (fp32, SDPA attention; partitioned when built under
        ZeRO-3's partitioned construction)."""
        from bigray.models.gpt import build_gpt

        config = self.config.__class__.from_dict(self.config.to_dict())
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = dropout
        model = build_gpt(config)
        state = self.state_dict()
        expected = set(model.state_dict())
        missing = expected - set(state) - {"lm_head.weight"}  # the head is tied to the token embedding
        unexpected = {k for k in set(state) - expected if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        if missing or unexpected:
            raise CheckpointError(
                f"weights in {self.path} do not fit a GPT-2 model of its config: "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        try:
            load_full_weights(model, state)
        except RuntimeError as e:
            raise CheckpointError(f"weights in {self.path} do not match its config: {e}") from None
        model.tie_weights()
        return model


def open_pretrained(path: str | Path) -> PretrainedGPT:
    """Resolve and check a base model; raise CheckpointError naming what is wrong."""
    from transformers import GPT2Config

    from bigray.data.text import load_tokenizer
    from bigray.export import resolve_checkpoint

    p = resolve_checkpoint(str(path))
    if not p.is_dir():
        raise CheckpointError(f"base model {p} does not exist")
    meta = None
    if (p / "bigray.json").exists():
        meta = read_meta(p, "gpt")
        model_dir = p / "model"
    elif (p / "config.json").exists():
        model_dir = p
    else:
        raise CheckpointError(f"{p} is neither a bigray GPT checkpoint nor a Hugging Face model directory (no config.json)")
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
        tok = load_tokenizer(model_dir)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{model_dir} has no usable tokenizer (the base model's tokenizer is kept): {e}") from None
    if len(tok) > config.vocab_size:
        raise CheckpointError(
            f"{model_dir}: the tokenizer has {len(tok)} tokens but the model's vocabulary (vocab_size) has "
            f"{config.vocab_size}; the tokenizer does not belong to this model"
        )
    return PretrainedGPT(path=p, model_dir=model_dir, meta=meta, config=config)
