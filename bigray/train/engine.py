"""Every DeepSpeed / ZeRO decision, in one place: the JSON config built from the typed config,
partitioned construction, the engine, saving and loading its state, gathering full weights, and
rebuilding fp32 weights from a checkpoint's shards.

The model never changes for parallelism (torchtitan's parallelize.py); no other module branches on
the ZeRO stage or calls DeepSpeed.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import pickle
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import torch

from bigray.artifacts.checkpoint import (
    PICKLE_ALLOWED,
    UNIVERSAL,
    UNIVERSAL_FILES,
    CheckpointError,
    check_universal,
    unsafe_pickled_types,
)
from bigray.config import DeepSpeedConfig, GPTTrainConfig

log = logging.getLogger(__name__)


NVME_AIO = dict(block_size=1 << 20, queue_depth=8, thread_count=1, single_submit=False, overlap_events=True)
"""DeepSpeed's async I/O settings for NVMe offload."""


def deepspeed_config(
    settings: DeepSpeedConfig, train: GPTTrainConfig, world_size: int, use_gpu: bool
) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run (``settings.precision`` already resolved, never 'auto').

    The optimizer is torch's AdamW (``torch_adam``; fused on GPUs), so nothing is compiled on first
    use; only optimizer offload needs DeepSpeed's CPU Adam op (a C++ build, or prebuilt in the image).
    bf16 under ZeRO 1-3 keeps gradients in fp32 while they accumulate and are reduced.
    """
    if settings.precision == "auto":
        raise ValueError("deepspeed_config needs a resolved precision (cluster.training_precision)")
    weights = (
        "fp32" if cpu_autocast(settings.precision, torch.device("cuda" if use_gpu else "cpu")) else settings.precision
    )
    zero: dict[str, Any] = {"stage": settings.zero_stage}
    if settings.zero_stage >= 1:
        zero.update(overlap_comm=use_gpu, contiguous_gradients=True, reduce_bucket_size=5e7)
    offload: dict[str, Any] = {"device": settings.offload_device, "pin_memory": use_gpu}
    if settings.offload_device == "nvme":
        offload["nvme_path"] = settings.nvme_path
    if settings.offload_optimizer:
        zero["offload_optimizer"] = dict(offload)
    if settings.offload_params:
        # NVMe parameter buffers must hold the largest parameter (the token embedding).
        zero["offload_param"] = {
            **offload,
            **({"buffer_count": 5, "buffer_size": 2e8} if settings.offload_device == "nvme" else {}),
        }
    if settings.zero_stage == 3:
        zero.update(
            stage3_gather_16bit_weights_on_model_save=True,
            stage3_param_persistence_threshold=1e4,
            # Bounded working memory: the optimizer steps sub-groups of 5e7 elements (its temporaries
            # are sized by them, not by the whole partition) and at most 1e8 gathered parameters live.
            sub_group_size=5e7,
            stage3_max_live_parameters=1e8,
            stage3_max_reuse_distance=1e8,
        )
    optimizer_params: dict[str, Any] = {
        "lr": train.lr,
        "betas": [train.beta1, train.beta2],
        "eps": 1e-8,
        "weight_decay": train.weight_decay,
    }
    if not settings.offload_optimizer:
        optimizer_params["torch_adam"] = True
        if use_gpu:
            optimizer_params["fused"] = True  # torch's fused CUDA AdamW kernel (no foreach, no JIT op)
    fp32_grads = weights == "bf16" and settings.zero_stage >= 1
    accumulation = train.accumulation(world_size)
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": train.micro_batch_size * accumulation * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": weights == "bf16"},
        "fp16": {"enabled": weights == "fp16", "initial_scale_power": 16},
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        **({"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"} if fp32_grads else {}),
        **({"aio": NVME_AIO} if settings.offload_device == "nvme" else {}),
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def import_deepspeed() -> ModuleType:
    """DeepSpeed, imported without the MLflow client its autotuner imports when it can.

    That optional import is most of DeepSpeed's import time (3.4 s of 4.0 s measured on this machine,
    paid by every worker of every run); bigray never runs DeepSpeed's autotuner and talks to MLflow
    itself (artifacts/tracking.py), which still imports it whenever a run tracks there."""
    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError while DeepSpeed imports
        try:
            import deepspeed  # noqa: F401
        finally:
            del sys.modules["mlflow"]
    import deepspeed

    return deepspeed


def cpu_autocast(precision: str, device: torch.device) -> bool:
    """Whether this run computes in bf16 under torch.autocast over fp32 weights (bf16 on a CPU).

    On GPUs DeepSpeed's bf16 mode keeps bf16 weights with fp32 masters in the optimizer; on CPUs the
    loop autocasts instead (torch's CPU mixed-precision recipe), so weights, gradients, their
    reduction and the optimizer all stay DeepSpeed's fp32 path."""
    return precision == "bf16" and device.type != "cuda"


def skip_inference_comm_op() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce when its comm layer starts.

    That op serves only ``inference_all_reduce`` (tensor-parallel inference), which training never
    calls; building it is a 30 s C++ compile on every fresh node (measured), and loading it a cost
    on every start. Marking it incompatible is DeepSpeed's own switch for ops a machine cannot build.
    """
    import_deepspeed()
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:  # only DeepSpeed's CPU accelerator has it (and probing ops elsewhere runs compilers)
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def initialize(model: torch.nn.Module, param_groups: list[dict], config: dict[str, Any]) -> Any:
    """Wrap ``model`` in a DeepSpeed engine on the already-initialised process group."""
    deepspeed = import_deepspeed()
    skip_inference_comm_op()
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups, config=config, dist_init_required=False
    )
    return engine


def set_lr(engine: Any, lr: float) -> None:
    """Set the learning rate of every parameter group (the schedule lives in train/optim.py)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


@contextlib.contextmanager
def partitioned_construction(config: dict[str, Any]) -> Iterator[None]:
    """Under ZeRO-3, models built inside are partitioned layer by layer as they are created.

    transformers' ``from_config`` runs construction under ``deepspeed.zero.Init`` while an
    ``HfDeepSpeedConfig`` is alive, so no rank ever holds the whole model: what lets 2 workers on
    one machine train a model neither could build alone. Other stages: a no-op.
    """
    if config["zero_optimization"]["stage"] != 3:
        yield
        return
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # DeepSpeed's own view of the (already initialised) process group, so the config sees the world size.
    skip_inference_comm_op()
    import_deepspeed().init_distributed(dist_backend=dist.get_backend(), dist_init_required=False, verbose=False)
    hf_config = HfDeepSpeedConfig(config)  # noqa: F841 - transformers holds only a weak reference
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def load_full_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy full weights into ``model``; ZeRO-3 partitions are gathered one parameter at a time and
    rank 0's copy (read from ``state`` only then, when it is lazy) is scattered back, so no rank holds
    the whole model at once."""
    params = dict(model.named_parameters())
    if not any(hasattr(p, "ds_id") for p in params.values()):
        own = model.state_dict()
        model.load_state_dict({k: state[k] for k in state if k in own}, strict=False)
        return
    import deepspeed
    import torch.distributed as dist

    with torch.no_grad():
        for name, p in params.items():
            if name not in state:
                continue
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if dist.get_rank() == 0:
                    p.data.copy_(state[name])


def full_state_dict(engine: Any, is_main: bool, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on the main rank (None elsewhere); ``trainable_only``: just the
    parameters that train (a LoRA run's adapters), no buffers.

    Under ZeRO-3 every rank must call this: each parameter is gathered on its own (a collective),
    copied to the CPU on the main rank and released, so no rank holds the full model twice.
    """
    module = engine.module
    if engine.zero_optimization_stage() != 3:
        if not is_main:
            return None
        if trainable_only:
            return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}
        return module.state_dict()
    import deepspeed

    aliases = {
        name: p for name, p in module.named_parameters(remove_duplicate=False) if p.requires_grad or not trainable_only
    }
    gathered: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for _, p in module.named_parameters():
            if trainable_only and not p.requires_grad:
                continue
            with deepspeed.zero.GatheredParameters([p]):
                if is_main:
                    gathered[id(p)] = p.detach().cpu().clone()
    if not is_main:
        return None
    state = {} if trainable_only else {k: v for k, v in module.state_dict().items() if k not in aliases}  # buffers
    state.update({name: gathered[id(p)] for name, p in aliases.items()})
    return state


def save_state(engine: Any, checkpoint_dir: str | Path, step: int, frozen: bool = True) -> None:
    """This rank's ZeRO shard (optimizer and, by stage, gradients/parameters) under ``<dir>/deepspeed``;
    ``frozen`` False leaves out the parameters that do not train (a LoRA run's base: rebuilt from it)."""
    engine.save_checkpoint(
        f"{checkpoint_dir}/deepspeed", tag="state", client_state={"step": step}, exclude_frozen_parameters=not frozen
    )


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside, DeepSpeed's own included, runs with ``weights_only=True``.

    DeepSpeed's checkpoint engine and zero_to_fp32 call ``torch.load(..., weights_only=False)``;
    here they get torch's weights-only unpickler with only the types in PICKLE_ALLOWED added, so a
    crafted checkpoint cannot run code even if it got past the completeness check.
    """
    allowed = []
    for name in PICKLE_ALLOWED:
        module, _, attr = name.rpartition(".")
        allowed.append(getattr(importlib.import_module(module), attr))
    original = torch.load

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError:
            unsafe = unsafe_pickled_types(f) if isinstance(f, (str, Path)) else ["a type outside the allow-list"]
            raise CheckpointError(
                f"{f} needs {', '.join(unsafe)} to load, which bigray never unpickles: refusing it"
            ) from None

    torch.load = load
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        torch.load = original


def load_state(
    engine: Any, checkpoint_dir: str | Path, frozen: bool = True, resharded: bool = False, origin: str | None = None
) -> None:
    """Restore this rank's part of the ZeRO state written by :func:`save_state` (weights-only
    unpickling): its own shard, or with ``resharded`` (the checkpoint was written by another number of
    ranks) its part of :func:`universal_state`. ``frozen`` False: the shard has no frozen parameters,
    which keep the values they were built with. ``origin``: the storage URI ``checkpoint_dir`` is a
    local copy of, where a conversion is uploaded."""
    source = universal_state(checkpoint_dir, origin) if resharded else Path(checkpoint_dir, "deepspeed")
    # DeepSpeed reads this flag when loading, not only when the engine is built (before the loop knew
    # which checkpoint it resumes from): Universal Checkpointing's documented switch, set per load.
    engine._config.load_universal_checkpoint = resharded
    groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    with weights_only_loads():
        path, _ = engine.load_checkpoint(
            str(source),
            tag="state",
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
            load_module_strict=frozen,
        )
    if path is None:
        raise CheckpointError(f"DeepSpeed found no state in {source}")
    # ZeRO-3's universal load gives every parameter group the first group's hyperparameters, so the
    # no-decay group (biases, norms) would be weight-decayed from then on: put each group's back.
    for group, own in zip(engine.optimizer.param_groups, groups):
        group.update(own)
    # ... and gives every flat fp32 partition the one same Adam step tensor, which each partition's
    # update then increments in place: the step count would run ahead, twice as fast with two groups
    # (a wrong bias correction). Each partition gets its own.
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def universal_state(checkpoint_dir: str | Path, origin: str | None = None) -> Path:
    """The checkpoint's ZeRO shards as a Universal Checkpoint (each parameter's fp32 weights and Adam
    moments whole, which any number of ranks re-partition on load), converted once into
    ``<checkpoint>/universal`` and reused after (checked whole first). One process per node converts
    (a lock); the result is renamed into place when complete, so an interrupted conversion leaves
    nothing half-written, and the checkpoint's own files are never touched. When the checkpoint is
    a local copy of ``origin`` (a storage URI), the conversion is uploaded beside it there (its file
    list last), so later resumes anywhere download it instead of converting again."""
    import argparse
    import io
    import json
    import shutil
    import tempfile

    import_deepspeed()
    from deepspeed.checkpoint import ds_to_universal

    from bigray.artifacts.storage import FileLock, file_sizes, join, upload

    ckpt = Path(checkpoint_dir)
    out = ckpt / UNIVERSAL
    with FileLock(ckpt / f".{UNIVERSAL}.lock"):
        if out.is_dir():
            check_universal(str(ckpt))
            return out
        staging = Path(tempfile.mkdtemp(dir=ckpt, prefix=f".{UNIVERSAL}-"))
        try:
            args = argparse.Namespace(
                input_folder=str(ckpt / "deepspeed" / "state"),
                output_folder=str(staging / "state"),
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=True,
            )
            with weights_only_loads(), contextlib.redirect_stdout(io.StringIO()):
                ds_to_universal.main(args)
            (staging / UNIVERSAL_FILES).write_text(json.dumps(file_sizes(str(staging)), indent=1))
            staging.rename(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("converted %s to a Universal Checkpoint (for another world size)", ckpt)
        if origin is not None:
            for part in sorted(out.iterdir(), key=lambda p: p.name == UNIVERSAL_FILES):  # the file list last
                upload(part, join(origin, UNIVERSAL, part.name))
            log.info("uploaded the Universal Checkpoint beside %s", origin)
    return out


def fp32_weights(checkpoint_dir: str | Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 master weights rebuilt from every rank's shard of a saved checkpoint (no engine
    needed; weights-only unpickling)."""
    ds_dir = Path(checkpoint_dir) / "deepspeed"
    with weights_only_loads():
        if zero_stage == 0:
            states = torch.load(str(ds_dir / "state" / "mp_rank_00_model_states.pt"), map_location="cpu")
            return {k: v.float() for k, v in states["module"].items()}
        import_deepspeed()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag="state")
