"""`bigray export CKPT OUT`: consolidate a GPT checkpoint's ZeRO shards into a Hugging Face directory.

The fp32 master weights are rebuilt from every rank's shard (train/engine.py) and written as
safetensors with the config and tokenizer, so ``AutoModelForCausalLM`` / ``AutoTokenizer`` load the
result directly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from bigray.artifacts.checkpoint import CheckpointError, read_meta
from bigray.artifacts.hf_gpt import save_hf_model
from bigray.artifacts.locate import resolve_checkpoint
from bigray.train.engine import fp32_weights

log = logging.getLogger(__name__)


def export_gpt(checkpoint: str, out: str) -> dict[str, Any]:
    """Write a Hugging Face model directory from a bigray GPT checkpoint; returns a summary."""
    from transformers import GPT2Config

    ckpt = resolve_checkpoint(checkpoint)
    meta = read_meta(ckpt, "gpt")
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"export target {out_dir} is not empty; choose a new directory")
    state_dict = fp32_weights(ckpt, meta["zero_stage"])
    model_cfg = GPT2Config.from_pretrained(str(ckpt / "model"))
    save_hf_model(state_dict, model_cfg, ckpt / "model", out_dir / ".partial")
    for f in (out_dir / ".partial").iterdir():
        f.rename(out_dir / f.name)
    (out_dir / ".partial").rmdir()
    log.info("exported %s (step %s, ZeRO-%s, %d ranks) to %s", ckpt, meta["step"], meta["zero_stage"], meta["world_size"], out_dir)
    return {"checkpoint": str(ckpt), "step": meta["step"], "zero_stage": meta["zero_stage"], "ranks": meta["world_size"]}
