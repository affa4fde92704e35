"""The LoRA adapter directory, in peft's own format (adapter_config.json + adapter_model.safetensors,
with the tokenizer), that LoRA checkpoints hold and ``bigray export --adapter``, peft and Serve read.
Its adapter_config names the base model (``base_model_name_or_path``)."""

from __future__ import annotations

from pathlib import Path

import torch

from bigray.artifacts.hf_gpt import HUB_PREFIX, looks_like_hub_id, save_tokenizer_and_generation

ADAPTER_CONFIG = "adapter_config.json"


def save_adapter(
    model: torch.nn.Module,
    trainable: dict[str, torch.Tensor],
    tokenizer_dir: str | Path,
    out: Path,
    generation_dir: Path | None = None,
) -> None:
    """An adapter directory in peft's format from the gathered trainable weights, with the tokenizer
    (and the base's generation config) so that it serves on its own base."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    adapter = get_peft_model_state_dict(model, state_dict=trainable)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in adapter.items()},
        str(out / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    model.peft_config["default"].save_pretrained(str(out))
    save_tokenizer_and_generation(tokenizer_dir, out, generation_dir)


def is_adapter(model_dir: str | Path) -> bool:
    return (Path(model_dir) / ADAPTER_CONFIG).is_file()


def base_of(adapter_dir: str | Path) -> str:
    """Where the adapter's base model lives, as its adapter config records it (peft writes a Hub
    model as a bare ``org/name``: named ``hf://org/name`` here, as everywhere in bigray)."""
    import json

    base = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    return HUB_PREFIX + base if looks_like_hub_id(base) else base


def merged(base: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """The base with the adapter's weights folded in (W + B A * alpha / r): a plain model of the base's class."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
