"""The base model of a fine-tuning run: a bigray GPT checkpoint or a Hugging Face directory of any
decoder-only causal LM transformers ships (GPT-2, Llama, Qwen2/Qwen3, Mistral, ...).

The driver resolves and checks it once (``recipes.gpt.open_pretrained``: architecture, vocabulary vs
tokenizer, weights format); workers reopen the directory it resolved (:meth:`PretrainedGPT.at`)
and build the model from it. Both kinds give the same weights: a bigray checkpoint contributes its
fp32 master weights rebuilt from every rank's ZeRO shard, exactly what ``bigray export`` writes; a
Hugging Face directory's safetensors are read tensor by tensor, so under ZeRO-3 no rank holds the
whole model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bigray.artifacts.checkpoint import CheckpointError, CheckpointMeta, model_files
from bigray.artifacts.hf_gpt import load_hf_weights
from bigray.artifacts.locate import local_model
from bigray.models.gpt import build_gpt, with_dropout
from bigray.train.engine import fp32_weights, load_full_weights

log = logging.getLogger(__name__)


@dataclass
class PretrainedGPT:
    path: Path
    """The local checkpoint or Hugging Face directory the weights come from (this node's copy of ``source``)."""
    source: str
    """Where the base model lives: a local path or a storage URI (what workers are handed)."""
    model_dir: Path
    """Directory holding config.json and the tokenizer (``<checkpoint>/model`` for a bigray checkpoint)."""
    meta: CheckpointMeta | None
    """bigray.json of a bigray checkpoint; None for a Hugging Face directory."""
    config: Any
    """The model's transformers config (GPT2Config, LlamaConfig, Qwen2Config, ...)."""

    @classmethod
    def at(cls, source: str) -> PretrainedGPT:
        """Reopen a base model the driver (``recipes.gpt.open_pretrained``) already resolved and checked
        (no re-checking of the metadata; a remote one is copied to this node once and its pickles
        scanned there)."""
        from transformers import AutoConfig

        p, meta = local_model(source, "gpt")
        return cls(
            path=p,
            source=source,
            model_dir=model_files(p),
            meta=meta,
            config=AutoConfig.from_pretrained(str(model_files(p))),
        )

    def state_dict(self) -> Mapping[str, torch.Tensor]:
        if self.meta is not None:
            return fp32_weights(self.path, self.meta.zero_stage)
        return load_hf_weights(self.model_dir)

    def build(self, dropout: float) -> torch.nn.Module:
        """The causal LM with these weights (fp32, SDPA attention; partitioned when built under
        ZeRO-3's partitioned construction)."""
        model = build_gpt(with_dropout(self.config, dropout))
        state = _model_names(self.state_dict(), model)
        params = {name for name, _ in model.named_parameters()}  # a tied head is not a parameter of its own
        missing = params - set(state)
        unexpected = {
            k for k in set(state) - set(model.state_dict()) if not k.endswith((".attn.bias", ".attn.masked_bias"))
        }
        if missing or unexpected:
            raise CheckpointError(
                f"weights in {self.path} do not fit a {self.config.model_type} model of its config: "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        try:
            load_full_weights(model, state)
        except RuntimeError as e:
            raise CheckpointError(f"weights in {self.path} do not match its config: {e}") from None
        model.tie_weights()
        return model


class _Renamed(Mapping[str, torch.Tensor]):
    """A weights mapping under the model's own parameter names (reads stay lazy)."""

    def __init__(self, weights: Mapping[str, torch.Tensor], names: dict[str, str]):
        self.weights, self.names = weights, names

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.weights[self.names[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _model_names(weights: Mapping[str, torch.Tensor], model: torch.nn.Module) -> Mapping[str, torch.Tensor]:
    """Files written by some savers (the Hub's own GPT-2) drop the base model's prefix ("h.0..." for
    "transformer.h.0..."): add it back wherever the model has the prefixed name."""
    own = set(model.state_dict())
    prefix = f"{model.base_model_prefix}."
    names = {(f"{prefix}{k}" if k not in own and f"{prefix}{k}" in own else k): k for k in weights}
    return _Renamed(weights, names)
