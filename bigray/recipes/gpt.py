"""GPT pretraining and fine-tuning, driver side: check and prepare once, then launch the worker loop.

Everything checkable without workers happens here, before any Ray work: paths pinned (workers have
their own cwd), the corpus tokenized or the fine-tuning data encoded, the base model opened, the
block size and windows checked, and a resume checkpoint resolved and checked against the job.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from bigray.artifacts.adapter import is_adapter
from bigray.artifacts.checkpoint import CheckpointError, CheckpointMeta, model_files
from bigray.artifacts.hf_gpt import is_hub_id, looks_like_hub_id, pinned, read_decoder_config
from bigray.artifacts.locate import local_model, resolve_checkpoint
from bigray.artifacts.storage import absolute
from bigray.config import ConfigError, FinetuneMethodConfig, GPTFinetuneConfig, GPTPretrainConfig, to_dict
from bigray.data import finetune as finetune_data
from bigray.data import text as text_data
from bigray.data.text import TextDataset
from bigray.models.gpt import shape
from bigray.recipes.launch import JobKind, PreparedJob, in_run_dir, launch, resuming
from bigray.train.context import LocalContext
from bigray.train.gpt import (
    KIND,
    GPTJob,
    check_block_fits,
    finetune_loop,
    pretrain_loop,
    pretrain_model_config,
    run_local,
    token_windows,
)
from bigray.train.pretrained import PretrainedGPT


def open_pretrained(path: str | Path) -> PretrainedGPT:
    """Resolve and check a base model (on the driver); raise CheckpointError naming what is wrong.
    A Hub id (``org/name``) is fetched to this node's cache (workers fetch their own copy)."""
    if looks_like_hub_id(str(path)):
        raise CheckpointError(f"{path} does not exist here; a Hugging Face Hub model is named hf://{path}")
    source = pinned(str(path)) if is_hub_id(str(path)) else resolve_checkpoint(str(path))
    p, meta = local_model(source, "gpt")  # a bigray checkpoint, or an exported, downloaded or Hub model (meta None)
    if is_adapter(model_files(p)):
        raise CheckpointError(
            f"{source} holds a LoRA adapter, not a whole model: fine-tune from its merged export (bigray export {source} OUT)"
        )
    return PretrainedGPT(
        path=p, source=source, model_dir=model_files(p), meta=meta, config=read_decoder_config(model_files(p))
    )


def check_targets(cfg: FinetuneMethodConfig, model_config: Any) -> None:
    """Refuse target modules the model does not have, or that are not linear layers, naming them
    (on the driver, before any worker starts: the model is built on the meta device, no weights)."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    if not cfg.lora_target_modules:
        return
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    modules = dict(model.named_modules())
    for target in cfg.lora_target_modules:
        matches = [m for name, m in modules.items() if name == target or name.endswith(f".{target}")]
        if not matches:
            leaves = sorted(
                {name.rsplit(".", 1)[-1] for name, m in modules.items() if isinstance(m, (torch.nn.Linear, Conv1D))}
            )
            raise ConfigError(
                "finetune.lora_target_modules",
                f"the {model_config.model_type} model has no module {target!r}; its linear layers: {', '.join(leaves)}",
            )
        if not all(isinstance(m, (torch.nn.Linear, Conv1D)) for m in matches):
            raise ConfigError(
                "finetune.lora_target_modules",
                f"{target!r} is a {type(matches[0]).__name__}, not a linear layer: LoRA adapts linear layers",
            )


def trainable_state(job: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint's trainable state is besides the model: all weights, or LoRA adapters of a
    rank on target modules (a job's config as a dict; pretraining has no finetune section)."""
    section = job.get("finetune") or {"method": "full"}
    if section["method"] != "lora":
        return {"method": section["method"]}
    return {k: section[k] for k in ("method", "lora_rank", "lora_target_modules")}


def check_resume_compatible(meta: CheckpointMeta, cfg: GPTJob, model_cfg: Any, tokenizer_sha: str) -> None:
    """Refuse a checkpoint that this job cannot continue from, saying why. Any world size can: ZeRO-0
    state is whole on every rank, ZeRO-1/2/3 shards (LoRA's included) are re-partitioned on load
    (train/engine.py universal_state); another ZeRO stage cannot."""
    saved = meta.config
    problems = []
    saved_shape = meta.model_shape  # absent in checkpoints written before fine-tuning existed
    if (saved_shape is not None and saved_shape != shape(model_cfg)) or saved["model"][
        "block_size"
    ] != cfg.model.block_size:
        problems.append(
            f"model (layers, heads, width, vocab) {saved_shape}/block {saved['model']['block_size']} "
            f"vs {shape(model_cfg)}/block {cfg.model.block_size}"
        )
    if meta.tokenizer_sha256 != tokenizer_sha:
        problems.append("it was trained with a different tokenizer")
    if trainable_state(saved) != trainable_state(to_dict(cfg)):
        problems.append(f"it was trained with {trainable_state(saved)}, this run with {trainable_state(to_dict(cfg))}")
    if saved["deepspeed"]["zero_stage"] != cfg.deepspeed.zero_stage:
        problems.append(f"it uses ZeRO stage {saved['deepspeed']['zero_stage']}, this run {cfg.deepspeed.zero_stage}")
    if problems:
        raise CheckpointError("cannot resume from this checkpoint: " + "; ".join(problems))


def prepare_pretrain(cfg: GPTPretrainConfig) -> PreparedJob:
    """Tokenize the corpus (or reuse its verified cache) and check the job against it."""
    cfg = dataclasses.replace(cfg, data=text_data.with_absolute_paths(cfg.data))
    data, _ = text_data.prepare_text(cfg.data)
    return _checked(cfg, data, pretrain_model_config(cfg, data))


def prepare_finetune(cfg: GPTFinetuneConfig) -> PreparedJob:
    """Open and check the base model, encode the fine-tuning data with its tokenizer, check the job."""
    base = open_pretrained(cfg.init_from)
    cfg = dataclasses.replace(cfg, init_from=base.source, data=finetune_data.with_absolute_paths(cfg.data))
    data = finetune_data.prepare_finetune_data(cfg.data, base.model_dir)
    check_block_fits(cfg.model.block_size, base.config)
    if cfg.finetune.method == "lora":
        check_targets(cfg.finetune, base.config)
    return _checked(cfg, data, base.config)


def _checked(cfg: GPTJob, data: TextDataset, model_cfg: Any) -> PreparedJob:
    if cfg.deepspeed.nvme_path:
        cfg = dataclasses.replace(
            cfg, deepspeed=dataclasses.replace(cfg.deepspeed, nvme_path=absolute(cfg.deepspeed.nvme_path))
        )
    cfg.scaling.require_global_batch(cfg.train.global_batch_size)
    for workers in cfg.scaling.world_sizes():  # the global batch splits over every world size the run may have
        cfg.train.accumulation(workers)
    for split in ("train", "val"):
        token_windows(data, split, cfg.model.block_size)
    if cfg.resume_from:
        cfg = dataclasses.replace(cfg, resume_from=resolve_checkpoint(cfg.resume_from))
    with resuming(cfg, KIND) as meta:
        if meta is not None:
            check_resume_compatible(meta, cfg, model_cfg, data.manifest["tokenizer_sha256"])
    return PreparedJob(config=cfg, data_dir=data.location)


def _reports(cfg: GPTJob) -> int:
    return math.ceil(cfg.train.max_steps / cfg.train.eval_interval)


def _progress(metrics: dict[str, Any], cfg: GPTJob) -> tuple[int, int]:
    return int(metrics.get("step", 0)), cfg.train.max_steps


def _for_search(cfg: GPTJob) -> GPTJob:
    """Every report of a trial carries val/loss: report at the eval interval."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, log_interval=cfg.train.eval_interval))


PRETRAIN = JobKind(
    "gpt", GPTPretrainConfig, prepare_pretrain, pretrain_loop, "val/loss", "min", _reports, _progress, _for_search
)
FINETUNE = JobKind(
    "gpt-finetune",
    GPTFinetuneConfig,
    prepare_finetune,
    finetune_loop,
    "val/loss",
    "min",
    _reports,
    _progress,
    _for_search,
)


def pretrain(cfg: GPTPretrainConfig) -> dict[str, Any]:
    """`bigray pretrain-gpt`: check everything that can be checked on the driver, then train on Ray."""
    return launch(PRETRAIN, cfg)


def finetune(cfg: GPTFinetuneConfig) -> dict[str, Any]:
    """`bigray finetune-gpt`: the pretraining loop, started from a base model on new data."""
    return launch(FINETUNE, cfg)


def train_local(cfg: GPTJob, run_dir: str) -> tuple[dict[str, Any], LocalContext]:
    """Prepare and train in this process without Ray (world size 1): tests, benchmarks, GPU boxes."""
    kind = next(k for k in (PRETRAIN, FINETUNE) if type(cfg) is k.config_class)
    prepared = kind.prepare(in_run_dir(cfg, run_dir))
    return run_local(prepared.config, prepared.data_dir, run_dir)
