"""`bigray export CKPT OUT`: consolidate a GPT checkpoint's ZeRO shards into a Hugging Face directory.

The fp32 master weights are rebuilt from every rank's shard (train/engine.py) and written as
safetensors with the config and tokenizer, so ``AutoModelForCausalLM`` / ``AutoTokenizer`` load the
result directly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from bigray.artifacts.adapter import base_of, is_adapter, merged
from bigray.artifacts.checkpoint import CheckpointError
from bigray.artifacts.hf_gpt import save_hf_model
from bigray.artifacts.locate import local_model, resolve_checkpoint
from bigray.artifacts.storage import file_sizes, is_dir, is_uri, upload
from bigray.recipes.gpt import open_pretrained
from bigray.train.engine import fp32_weights

log = logging.getLogger(__name__)


def export_gpt(checkpoint: str, out: str, adapter: bool = False) -> dict[str, Any]:
    """Write a Hugging Face model directory from a bigray GPT checkpoint; returns a summary.

    A LoRA checkpoint exports merged (its base with the adapter folded in: a plain model of the
    base's architecture), or with ``adapter`` as the adapter directory alone (peft's format).
    Either side may be a storage URI: a remote checkpoint is copied down once (this node's cache),
    a remote target is written locally and uploaded at the end. A target that already holds files is
    refused, so nothing there is overwritten.
    """
    import shutil
    import tempfile

    from transformers import AutoConfig

    if is_dir(out) and file_sizes(out):
        raise CheckpointError(f"export target {out} is not empty; choose a new directory")
    source = resolve_checkpoint(checkpoint)
    ckpt, meta = local_model(source, "gpt")
    if meta is None:
        raise CheckpointError(f"{source} is already an exported model directory, not a bigray checkpoint")
    lora = is_adapter(ckpt / "model")
    if adapter and not lora:
        raise CheckpointError(
            f"{source} is a full fine-tuning checkpoint: it has no adapter to export (leave out --adapter)"
        )
    with tempfile.TemporaryDirectory(prefix="bigray-export-") as staging:
        out_dir = Path(staging) if is_uri(out) else Path(out)
        if adapter:
            shutil.copytree(ckpt / "model", out_dir / ".partial")
        elif lora:
            base = open_pretrained(base_of(ckpt / "model"))
            model = merged(base.build(0.0), ckpt / "model")
            save_hf_model(
                model.state_dict(), base.config, ckpt / "model", out_dir / ".partial", generation_dir=ckpt / "model"
            )
        else:
            model_cfg = AutoConfig.from_pretrained(str(ckpt / "model"))
            state_dict = fp32_weights(ckpt, meta.zero_stage)
            save_hf_model(state_dict, model_cfg, ckpt / "model", out_dir / ".partial", generation_dir=ckpt / "model")
        for f in (out_dir / ".partial").iterdir():
            f.rename(out_dir / f.name)
        (out_dir / ".partial").rmdir()
        if is_uri(out):
            upload(out_dir, out)
    log.info("exported %s (step %s, ZeRO-%s, %d ranks) to %s", source, meta.step, meta.zero_stage, meta.world_size, out)
    kind = "adapter" if adapter else "merged" if lora else "full"
    return {
        "checkpoint": source,
        "step": meta.step,
        "zero_stage": meta.zero_stage,
        "ranks": meta.world_size,
        "kind": kind,
    }
