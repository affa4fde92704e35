"""`bigray export CKPT OUT`: consolidate a GPT checkpoint's ZeRO shards into a Hugging Face directory.

The fp32 master weights are rebuilt from every rank's shard with DeepSpeed's zero_to_fp32
(ZeRO 1-3) or read from the model states (ZeRO 0), then written as safetensors with the config
and tokenizer, so ``AutoModelForCausalLM`` / ``AutoTokenizer`` load the result directly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from bigray.checkpoint import CheckpointError, read_meta

log = logging.getLogger(__name__)


def resolve_checkpoint(path: str) -> Path:
    """Accept a checkpoint directory, a run directory (its newest complete checkpoint) or a summary.json."""
    from bigray.checkpoint import latest_complete

    p = Path(path)
    if p.is_file() and p.name == "summary.json":
        ckpt = json.loads(p.read_text()).get("checkpoint")
        if not ckpt:
            raise CheckpointError(f"{p} records no checkpoint")
        return Path(ckpt)
    if p.is_dir() and not (p / "bigray.json").exists() and not (p / "config.json").exists():
        if (p / "summary.json").is_file():
            return resolve_checkpoint(str(p / "summary.json"))
        found = latest_complete(p)
        if found is None:
            raise CheckpointError(f"{p} holds no complete bigray checkpoint")
        return found
    return p


def consolidated_state_dict(checkpoint: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Full fp32 weights from the ZeRO shards of every rank."""
    ds_dir = checkpoint / "deepspeed"
    if meta["zero_stage"] == 0:
        states = torch.load(ds_dir / "state" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag="state")


def export_gpt(checkpoint: str, out: str) -> dict[str, Any]:
    """Write a Hugging Face model directory from a bigray GPT checkpoint; returns a summary."""
    from transformers import GPT2Config

    from bigray.train.gpt import save_hf_model

    ckpt = resolve_checkpoint(checkpoint)
    meta = read_meta(ckpt, "gpt")
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"export target {out_dir} is not empty; choose a new directory")
    state_dict = consolidated_state_dict(ckpt, meta)
    model_cfg = GPT2Config.from_pretrained(str(ckpt / "model"))
    save_hf_model(state_dict, model_cfg, ckpt / "model", out_dir / ".partial")
    for f in (out_dir / ".partial").iterdir():
        f.rename(out_dir / f.name)
    (out_dir / ".partial").rmdir()
    log.info("exported %s (step %s, ZeRO-%s, %d ranks) to %s", ckpt, meta["step"], meta["zero_stage"], meta["world_size"], out_dir)
    return {"checkpoint": str(ckpt), "step": meta["step"], "zero_stage": meta["zero_stage"], "ranks": meta["world_size"]}
