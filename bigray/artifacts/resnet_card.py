"""The ResNet model format: ``model/model.safetensors`` plus ``model/model.json`` (architecture, class
names, normalisation), enough for a server to rebuild the model and preprocess exactly as training did."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from bigray.artifacts.checkpoint import CheckpointError, model_files
from bigray.models.resnet import build_resnet


def save_classifier(model_dir: Path, state_dict: dict[str, torch.Tensor], card: dict[str, Any]) -> None:
    """Write the weights (safetensors) and the model card into ``model_dir``."""
    from safetensors.torch import save_file

    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    (model_dir / "model.json").write_text(json.dumps(card, indent=2))


def load_classifier(directory: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A ResNet rebuilt from a checkpoint's model/ directory alone (no unpickling), and its card."""
    from safetensors.torch import load_file

    d = Path(directory)
    files = model_files(d)
    card_path = files / "model.json"
    if not card_path.is_file():
        raise CheckpointError(f"{directory} is not a ResNet checkpoint (no model/model.json)")
    card = json.loads(card_path.read_text())
    info = card["data"]
    model = build_resnet(card["arch"], len(info["class_names"]), info["channels"], card["small_input_stem"])
    model.load_state_dict(load_file(str(files / "model.safetensors")))
    return model.eval(), card
