"""The GPT training loop (worker side): plain torch + DeepSpeed, under Ray Train or alone at world size 1.

Workers open the data the driver prepared (``data_dir`` in their config) and never rebuild it.
Data position, learning rate and randomness are functions of (seed, step, sample index), not of
the rank, and checkpoints hold every rank's ZeRO shard, so a resumed run continues exactly where the
saved one stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.profiler import record_function

from bigray.artifacts.adapter import save_adapter
from bigray.artifacts.checkpoint import CheckpointMeta, read_meta, write_meta, write_rank_marker
from bigray.artifacts.hf_gpt import save_hf_model
from bigray.cluster import enable_tf32, training_precision
from bigray.config import ConfigError, GPTFinetuneConfig, GPTPretrainConfig, from_dict, to_dict
from bigray.data.cache import DataError
from bigray.data.documents import EOS, load_tokenizer
from bigray.data.order import DIGEST_MOD, sample_digest
from bigray.data.text import TextDataset, TokenWindows, open_prepared
from bigray.models.gpt import build_gpt, context_length, decoder_config, flops_per_token, shape
from bigray.train import engine as zero
from bigray.train.context import (
    LocalContext,
    RayContext,
    Stretch,
    TrainContext,
    checkpoint_to_resume,
    drop_abandoned_checkpoints,
    new_checkpoint_dir,
    permanent_failures_end_the_run,
)
from bigray.train.lm_loss import fuse_loss, mean_loss
from bigray.train.lora import apply_lora
from bigray.train.metrics import RunLog, StartUp, peak_flops
from bigray.train.optim import decay_groups, gpt_lr
from bigray.train.pretrained import PretrainedGPT

log = logging.getLogger(__name__)

KIND = "gpt"
NOTICE_CHECK_S = 2.0
"""Seconds of training between two questions to Ray Train whether a node of the run is going away
(its watcher polls Ray's drains every 5 s; a cloud gives 30 s to 2 minutes of notice)."""

GPTJob = GPTPretrainConfig | GPTFinetuneConfig
"""Pretraining and fine-tuning share this module's loop; they differ only in where weights and data come from."""


def pretrain_model_config(cfg: GPTPretrainConfig, data: TextDataset) -> Any:
    """The model config of a pretraining job; raises ConfigError if the block does not fit the positions."""
    tok = load_tokenizer(data.tokenizer_dir)
    model_cfg = decoder_config(
        cfg.model.family, cfg.model.preset, data.vocab_size, cfg.model.dropout, tok.convert_tokens_to_ids(EOS)
    )
    check_block_fits(cfg.model.block_size, model_cfg)
    return model_cfg


def check_block_fits(block_size: int, model_cfg: Any) -> None:
    if block_size > context_length(model_cfg):
        raise ConfigError(
            "model.block_size", f"{block_size} is larger than the model's {context_length(model_cfg)} positions"
        )


def token_windows(data: TextDataset, split: str, block_size: int) -> TokenWindows:
    """The window reader of one split; a split shorter than one window is an error naming it."""
    try:
        return TokenWindows(data.tokens(split), block_size, data.loss_mask(split), data.example_starts(split))
    except DataError as e:
        raise DataError(f"{split} data: {e} (use more data or a smaller model.block_size)") from None


@dataclass(frozen=True)
class Start:
    """What pretraining and fine-tuning do differently, in one place: the first weights (seeded random
    init from a preset, or the base model: model config, model and the base's directory), whether the
    trainable state is LoRA adapters, whether packed examples are kept apart, and whether runs report
    the starting model's val loss on the new data (the bar a fine-tune must beat)."""

    initial_model: Callable[[Any, TextDataset], tuple[Any, torch.nn.Module, Path | None]]
    lora: Callable[[Any], bool] = lambda cfg: False
    isolate_examples: Callable[[Any], bool] = lambda cfg: False
    reports_base_loss: bool = False


def _fresh_model(cfg: GPTPretrainConfig, data: TextDataset) -> tuple[Any, torch.nn.Module, None]:
    model_cfg = pretrain_model_config(cfg, data)
    return model_cfg, build_gpt(model_cfg, seed=cfg.train.seed), None


def _base_model(cfg: GPTFinetuneConfig, data: TextDataset) -> tuple[Any, torch.nn.Module, Path]:
    base = PretrainedGPT.at(cfg.init_from)
    check_block_fits(cfg.model.block_size, base.config)
    return base.config, base.build(cfg.model.dropout), base.model_dir


STARTS: dict[type, Start] = {
    GPTPretrainConfig: Start(_fresh_model),
    GPTFinetuneConfig: Start(
        _base_model,
        lora=lambda cfg: cfg.finetune.method == "lora",
        isolate_examples=lambda cfg: cfg.data.isolate_examples,
        reports_base_loss=True,
    ),
}
"""Each GPT job's start, by its config class."""


def isolated_examples(starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask [B, 1, T, T] and position ids [B, T] that keep packed examples apart, from where
    each example starts (bool [B, T]): a token attends only to earlier tokens of its own example and
    positions restart at each example's first token (a window's first, partial example starts at 0).
    Boundaries come from the data, not from a token: chat templates end every turn with an end token."""
    example = starts.long().cumsum(-1)
    index = torch.arange(starts.shape[1], device=starts.device).expand_as(starts)
    first = starts.clone()
    first[:, 0] = True
    positions = index - torch.cummax(torch.where(first, index, 0), dim=-1).values
    causal = torch.ones(starts.shape[1], starts.shape[1], dtype=torch.bool, device=starts.device).tril()
    return (causal & (example[:, :, None] == example[:, None, :]))[:, None], positions


class GPTTrainer:
    """State of one rank's training: engine, data readers, step counter and throughput meters."""

    def __init__(
        self,
        cfg: GPTJob,
        ctx: TrainContext,
        data_dir: str,
        run_dir: str | None = None,
        submitted_at: float | None = None,
    ):
        self.cfg, self.ctx, self.run_dir = cfg, ctx, run_dir
        self.start = STARTS[type(cfg)]
        self.startup = StartUp(submitted_at)
        torch.set_num_threads(cfg.scaling.threads)
        self.device = ctx.device(cfg.scaling.use_gpu)
        enable_tf32(self.device)
        with self.startup.phase("data open"):
            self.data = open_prepared(data_dir)
            bs = cfg.model.block_size
            self.train_windows = token_windows(self.data, "train", bs)
            self.val_windows = token_windows(self.data, "val", bs)
        ds = dataclasses.replace(
            cfg.deepspeed, precision=training_precision(cfg.deepspeed.precision, self.device, cpu_bf16=True)
        )
        self.cpu_bf16 = zero.cpu_autocast(ds.precision, self.device)
        self.ds_config = zero.deepspeed_config(ds, cfg.train, ctx.world_size, cfg.scaling.use_gpu)
        with self.startup.phase("model build"):
            with zero.partitioned_construction(self.ds_config):
                self.model_cfg, model, self.base_dir = self.start.initial_model(cfg, self.data)
            if cfg.deepspeed.activation_checkpointing:
                model.gradient_checkpointing_enable()
            self.lora = self.start.lora(cfg)
            if self.lora:
                model = apply_lora(model, cfg.finetune, cfg.init_from)
            wants_fused = cfg.train.fused_loss == "on" or (cfg.train.fused_loss == "auto" and self.device.type == "cpu")
            self.fused_loss = wants_fused and fuse_loss(model)
        with self.startup.phase("DeepSpeed init"):
            self.engine = zero.initialize(model, decay_groups(model, cfg.train.weight_decay), self.ds_config)
        self.isolate = self.train_windows.example_starts is not None and self.start.isolate_examples(cfg)
        """Packed examples must not attend to each other (fine-tuning on jsonl or chat rows)."""
        self.step = 0
        self.train_seconds = 0.0
        """Wall clock of the run's training steps so far, the same on every rank (train.max_minutes)."""
        self.stretch = Stretch(ctx.world_size)
        self.next_notice_check = 0.0
        """train_seconds at which to ask again whether a node of the run is going away (inf once told)."""
        self.grad_accum = cfg.train.accumulation(ctx.world_size)
        self.global_batch = cfg.train.micro_batch_size * self.grad_accum * ctx.world_size
        """Sequences per optimizer step over all ranks: samples [step * global_batch, (step + 1) * global_batch)."""
        self.flops_per_token = flops_per_token(self.model_cfg, bs)
        with self.startup.phase("matmul peak"):
            self.peak = peak_flops(self.device, ds.precision)
        self.tokens_per_step = cfg.train.micro_batch_size * self.grad_accum * bs  # per rank
        with self.startup.phase("run log"):
            self.run_log = RunLog.for_job(
                cfg,
                ctx,
                run_dir,
                self.device,
                zero_stage=ds.zero_stage,
                precision=ds.precision,
                offload_optimizer=ds.offload_optimizer,
                offload_params=ds.offload_params,
            )

    # ------------------------------------------------------------------ data and loss

    def _micro_batch_start(self, index: int) -> int:
        """The first sample of this rank's part of global micro batch ``index`` (counted over all ranks)."""
        return (index * self.ctx.world_size + self.ctx.rank) * self.cfg.train.micro_batch_size

    def _batch(
        self, windows: TokenWindows, start: int, shuffle: bool
    ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], int]:
        """Inputs, targets and (when examples are kept apart) where each example starts, of samples
        [start, start + micro_batch_size) of the split's stream; and their sample digest."""
        with record_function("data"):
            count = self.cfg.train.micro_batch_size
            ids = windows.windows_at(seed=self.cfg.train.seed, start=start, count=count, shuffle=shuffle)
            x, y = windows.batch(ids)
            starts = torch.from_numpy(windows.starts(ids)).to(self.device) if self.isolate else None
            inputs = torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device), starts
            return inputs, sample_digest(np.arange(start, start + count), ids)

    def _loss(self, x: torch.Tensor, y: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
        """Mean loss of a micro batch; on a CPU training in bf16, matmuls run in bf16 under torch
        autocast while the weights, gradients and optimizer state stay fp32."""
        inputs = {}
        if starts is not None:
            mask, positions = isolated_examples(starts)
            inputs = {"attention_mask": mask, "position_ids": positions}
        with record_function("forward"), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cpu_bf16):
            if self.fused_loss:  # the model returns its loss (train/lm_loss.py)
                return self.engine(input_ids=x, labels=y, **inputs)
            with record_function("forward/model"):
                logits = self.engine(input_ids=x, **inputs).logits
            with record_function("forward/loss"):
                return mean_loss(logits, y)

    def _sum_across_ranks(self, *values: torch.Tensor | float) -> list[float]:
        """One all-reduce and one host sync for values every rank holds (a step's loss, its window digest)."""
        with record_function("sync"):
            t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device).reshape(()) for v in values])
            dist.all_reduce(t)
            return t.tolist()

    # ------------------------------------------------------------------ train / eval

    def train_step(self) -> dict[str, float]:
        """One optimizer step (the global batch: grad_accum micro batches per rank); returns its metrics.

        Each micro batch's randomness (dropout) is seeded from (seed, its first sample), so a step
        trains the same at any world size and after any resume."""
        cfg = self.cfg.train
        lr = gpt_lr(self.step, cfg, self.train_seconds)
        zero.set_lr(self.engine, lr)
        self.engine.train()
        t0 = time.perf_counter()
        # summed on the device: no host sync per micro batch
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        digest = 0
        for micro in range(self.grad_accum):
            start = self.step * self.global_batch + self._micro_batch_start(micro)
            torch.manual_seed(int(np.random.SeedSequence([cfg.seed, start]).generate_state(1)[0]))
            inputs, windows = self._batch(self.train_windows, start, shuffle=True)
            digest += windows
            loss = self._loss(*inputs)
            with record_function("backward"):
                self.engine.backward(loss)
            with record_function("optimizer"):
                self.engine.step()
            total += loss.detach()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.step += 1
        grad_norm = self.engine.get_global_grad_norm()
        loss_sum, digest_sum, dt_sum = self._sum_across_ranks(total / self.grad_accum, digest, dt)
        loss = loss_sum / self.ctx.world_size
        self.train_seconds += dt_sum / self.ctx.world_size
        if not math.isfinite(loss):
            raise FloatingPointError(f"training diverged: loss is {loss} at step {self.step} (lr {lr:.3g})")
        tokens_per_s = self.tokens_per_step / dt
        achieved = self.flops_per_token * tokens_per_s
        return {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "train/step_time_s": dt,
            "train/tokens_per_s": tokens_per_s * self.ctx.world_size,
            "train/tokens_per_s_per_worker": tokens_per_s,
            "train/tflops_per_worker": achieved / 1e12,
            "train/mfu": achieved / self.peak if self.peak else float("nan"),
            "train/world_size": self.ctx.world_size,
            "train/windows": int(digest_sum) % DIGEST_MOD,
            "train/seconds": self.train_seconds,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The mean loss of the val split's first eval_batches micro batches, whatever the world size:
        rank r takes micro batches r, r + world_size, ...; every rank runs as many forwards (a ZeRO-3
        forward is collective), one past the end repeating the last micro batch with weight 0."""
        self.engine.eval()
        count, world = self.cfg.train.eval_batches, self.ctx.world_size
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in range(self.ctx.rank, math.ceil(count / world) * world, world):
            inputs, _ = self._batch(
                self.val_windows, min(i, count - 1) * self.cfg.train.micro_batch_size, shuffle=False
            )
            total += self._loss(*inputs).double() * (i < count)
        val = self._sum_across_ranks(total)[0] / count
        return {"val/loss": val, "val/perplexity": math.exp(min(val, 50.0))}

    # ------------------------------------------------------------------ checkpoints

    def save(self, metrics: dict[str, Any]) -> str:
        """Write this rank's part of a checkpoint into a fresh local directory and return it (no RNG
        state: every micro batch seeds its own randomness, see train_step)."""
        d = new_checkpoint_dir()
        zero.save_state(self.engine, d, self.step, frozen=not self.lora)
        state_dict = zero.full_state_dict(self.engine, self.ctx.is_main, trainable_only=self.lora)
        if state_dict is not None:
            if self.lora:  # the adapter only: the frozen base is where init_from says
                save_adapter(
                    self.engine.module,
                    state_dict,
                    self.data.tokenizer_dir,
                    Path(d, "model"),
                    generation_dir=self.base_dir,
                )
            else:
                save_hf_model(
                    state_dict, self.model_cfg, self.data.tokenizer_dir, Path(d, "model"), generation_dir=self.base_dir
                )
            write_meta(
                d,
                CheckpointMeta(
                    kind=KIND,
                    step=self.step,
                    world_size=self.ctx.world_size,
                    segments=self.stretch.segments(self.step),
                    writer_ranks=list(range(self.ctx.world_size)),
                    config=to_dict(self.cfg),
                    metrics=metrics,
                    zero_stage=self.cfg.deepspeed.zero_stage,
                    model_shape=shape(self.model_cfg),
                    tokenizer_sha256=self.data.manifest["tokenizer_sha256"],
                    train_seconds=self.train_seconds,
                ),
            )
        write_rank_marker(d, self.ctx.rank)
        return d

    def load(self, directory: str, origin: str | None = None) -> CheckpointMeta:
        """Restore weights, optimizer and step from a checkpoint the driver checked against this job
        (recipes.launch.resuming); ``origin``: the storage URI ``directory`` is a local copy of. Returns
        its metadata."""
        meta = read_meta(directory, KIND)
        # ZeRO-0 state is whole on every rank
        resharded = meta.world_size != self.ctx.world_size and bool(meta.zero_stage)
        zero.load_state(self.engine, directory, frozen=not self.lora, resharded=resharded, origin=origin)
        self.step = meta.step
        self.train_seconds = meta.train_seconds or 0.0
        self.next_notice_check = self.train_seconds
        self.stretch.resume(meta, self.step, self.ctx.is_main)
        log.info("rank %d resumed from %s at step %d", self.ctx.rank, directory, self.step)
        return meta

    def _log(self, metrics: dict[str, Any], checkpoint: bool) -> None:
        self.run_log.write(metrics, self.step, checkpoint=checkpoint)
        if not self.ctx.is_main:
            return
        val = f" val {metrics['val/loss']:.4f} ppl {metrics['val/perplexity']:.1f}" if "val/loss" in metrics else ""
        budget = self.cfg.train.max_minutes
        log.info(
            "step %d/%d%s loss %.4f%s lr %.2e %.0f tok/s mfu %.1f%% %.2fs/step",
            self.step,
            self.cfg.train.max_steps,
            f" ({self.train_seconds / 60:.1f}/{budget:g} min)" if budget else "",
            metrics["train/loss"],
            val,
            metrics["train/lr"],
            metrics["train/tokens_per_s"],
            100 * metrics["train/mfu"],
            metrics["train/step_time_s"],
        )

    # ------------------------------------------------------------------ the loop

    def preemption_noticed(self) -> dict[str, float]:
        """At the first check after a node of the run announced it is going away: the seconds left
        (``preemption/deadline_s``), so this step saves a checkpoint and a preemption costs seconds
        of training, not up to checkpoint_interval steps. Asked every NOTICE_CHECK_S of training
        (the question is a collective, ~5 ms; train_seconds is the same on every rank, so every rank
        asks at the same step); once per start."""
        if self.train_seconds < self.next_notice_check:
            return {}
        self.next_notice_check = self.train_seconds + NOTICE_CHECK_S
        left = self.ctx.seconds_until_preemption()
        if left is None:
            return {}
        self.next_notice_check = math.inf  # once per start
        if self.ctx.is_main:
            log.warning("a node of this run goes in %.0f s: saving a checkpoint at step %d", left, self.step)
        return {"preemption/deadline_s": left if math.isfinite(left) else -1.0}

    def finished(self) -> bool:
        """max_steps reached, or train.max_minutes spent (every rank agrees: train_seconds is all-reduced)."""
        t = self.cfg.train
        return self.step >= t.max_steps or bool(t.max_minutes) and self.train_seconds >= 60 * t.max_minutes

    def run(self) -> dict[str, Any]:
        """Train to ``train.max_steps`` or through ``train.max_minutes`` (resuming first if there is a
        checkpoint); returns the last metrics.

        Every ``log_interval`` steps rank 0 writes the run log (metrics.jsonl, TensorBoard, the
        tracker); only checkpoints and evaluations are reported to Ray (Tune's schedulers compare
        evaluations). Ray Train's controller takes one report per poll (every 2 s), so a report per
        logged step would keep a finished run waiting for its queue to drain: a minute for 30 reports.
        """
        t = self.cfg.train
        with (
            self.startup.phase("resume"),
            checkpoint_to_resume(self.ctx, self.cfg.resume_from, self.run_dir, KIND) as ckpt,
        ):
            saved = self.load(ckpt.directory, ckpt.origin) if ckpt else None
            drop_abandoned_checkpoints(self.ctx, self.run_dir, "checkpoint_step", self.step)
        # Fine-tuning reports the base model's val loss on the new data with every report: the bar to beat.
        initial: dict[str, Any] = {}
        if saved is not None:
            initial = {k: v for k, v in saved.metrics.items() if k.startswith("init/")}
        elif self.start.reports_base_loss:
            initial = {"init/val_loss": self.evaluate()["val/loss"]}
            log.info("base model val loss on the fine-tuning data: %.4f", initial["init/val_loss"])
        metrics: dict[str, Any] = {}
        while not self.finished():
            first = self.startup is not None  # start-up is logged once, with the first step's metrics
            with self.startup.phase("first step") if first else contextlib.nullcontext():
                metrics = {"step": self.step + 1, **self.train_step(), **initial}
            self.stretch.stepped(self.ctx.is_main)
            if first:
                if self.ctx.is_main:
                    log.info("%s", self.startup.summary())
                metrics.update(self.startup.metrics())
                self.startup = None
            last = self.finished()
            notice = self.preemption_noticed()
            metrics.update(notice)
            checkpoint_now = self.step % self.cfg.run.checkpoint_interval == 0 or last or bool(notice)
            if self.step % t.eval_interval == 0 or checkpoint_now:
                metrics.update(self.evaluate())
            if checkpoint_now or first or self.step % t.log_interval == 0 or "val/loss" in metrics:
                self._log(metrics, checkpoint_now)
            if checkpoint_now or "val/loss" in metrics:  # what Ray consumes (see the docstring)
                ckpt_dir = self.save(metrics) if checkpoint_now else None
                self.ctx.report(metrics, ckpt_dir, f"checkpoint_step_{self.step:07d}" if ckpt_dir else None)
        self.run_log.close()
        return metrics


def _ray_loop(cfg: GPTJob, config: dict[str, Any]) -> None:
    ctx = RayContext(cfg.run.preemption_notice)
    with permanent_failures_end_the_run(ctx, config["run_dir"]):
        GPTTrainer(cfg, ctx, config["data_dir"], config["run_dir"], config.get("submitted_at")).run()


def pretrain_loop(config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker for pretraining: untyped dict in, typed config from here on."""
    _ray_loop(from_dict(GPTPretrainConfig, config["job"]), config)


def finetune_loop(config: dict[str, Any]) -> None:
    """The same loop for fine-tuning (only the config type differs)."""
    _ray_loop(from_dict(GPTFinetuneConfig, config["job"]), config)


def run_local(cfg: GPTJob, data_dir: str, run_dir: str) -> tuple[dict[str, Any], LocalContext]:
    """The same loop in this process without Ray (world size 1), on data already prepared."""
    ctx = LocalContext(run_dir)
    metrics = GPTTrainer(cfg, ctx, data_dir, run_dir).run()
    return metrics, ctx
