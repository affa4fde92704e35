"""`bigray export CKPT OUT`: consolidate a GPT checkpoint's ZeRO shards into a Hugging Face directory.

The fp32 master weights are rebuilt from every rank's shard (train/engine.py) and written as
safetensors with the config and tokenizer, so ``AutoModelForCausalLM`` / ``AutoTokenizer`` load the
result directly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from bigray.artifacts.checkpoint import CheckpointError
from bigray.artifacts.hf_gpt import save_hf_model
from bigray.artifacts.locate import checked_local_checkpoint, resolve_checkpoint
from bigray.artifacts.storage import file_sizes, is_dir, is_uri, upload
from bigray.train.engine import fp32_weights

log = logging.getLogger(__name__)


def export_gpt(checkpoint: str, out: str) -> dict[str, Any]:
    """Write a Hugging Face model directory from a bigray GPT checkpoint; returns a summary.

    Either side may be a storage URI: a remote checkpoint is copied down once (this node's cache),
    a remote target is written locally and uploaded at the end. A target that already holds files is
    refused, so nothing there is overwritten.
    """
    import tempfile

    from transformers import AutoConfig

    if is_dir(out) and file_sizes(out):
        raise CheckpointError(f"export target {out} is not empty; choose a new directory")
    source = resolve_checkpoint(checkpoint)
    ckpt, meta = checked_local_checkpoint(source, "gpt")
    if meta is None:
        raise CheckpointError(f"{source} is already an exported model directory, not a bigray checkpoint")
    state_dict = fp32_weights(ckpt, meta["zero_stage"])
    model_cfg = AutoConfig.from_pretrained(str(ckpt / "model"))
    with tempfile.TemporaryDirectory(prefix="bigray-export-") as staging:
        out_dir = Path(staging) if is_uri(out) else Path(out)
        save_hf_model(state_dict, model_cfg, ckpt / "model", out_dir / ".partial", generation_dir=ckpt / "model")
        for f in (out_dir / ".partial").iterdir():
            f.rename(out_dir / f.name)
        (out_dir / ".partial").rmdir()
        if is_uri(out):
            upload(out_dir, out)
    log.info("exported %s (step %s, ZeRO-%s, %d ranks) to %s", source, meta["step"], meta["zero_stage"], meta["world_size"], out)
    return {"checkpoint": source, "step": meta["step"], "zero_stage": meta["zero_stage"], "ranks": meta["world_size"]}
