"""GPT pretraining with DeepSpeed ZeRO on a real local Ray cluster (2 CPU workers, tiny model).

The ZeRO-2 run and what is checked on it (training, every rank's checkpoint, export, refused inputs)
are `make test-fast`'s real 2-worker Ray Train run; the other runs are marked slow."""

import dataclasses
import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from bigray.artifacts.checkpoint import CheckpointError, read_meta
from bigray.config import ConfigError, GPTPretrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def tiny_config(small_text, tmp_path, name, *overrides):
    text_cfg, _ = small_text
    return load_config(
        GPTPretrainConfig,
        REPO / "jobs" / "configs" / "gpt_tiny.yaml",
        [
            f"data.cache_dir={text_cfg.cache_dir}",
            f"data.max_chars={text_cfg.max_chars}",
            f"data.vocab_size={text_cfg.vocab_size}",
            "model.block_size=64",
            "train.micro_batch_size=8",
            "train.max_steps=30",
            "train.warmup_steps=5",
            "train.lr=3e-3",
            "train.eval_interval=10",
            "train.eval_batches=4",
            "train.log_interval=1",
            "run.checkpoint_interval=10",
            "run.keep_checkpoints=3",
            f"run.storage_path={tmp_path}",
            f"run.name={name}",
            *overrides,
        ],
    )


def budget_config(small_text, tmp_path, minutes, *overrides):
    """The tiny run "budget" under train.max_minutes: no step limit, no evaluation or checkpoint before the end."""
    return tiny_config(
        small_text,
        tmp_path,
        "budget",
        f"train.max_minutes={minutes}",
        "train.max_steps=100000",
        "train.eval_interval=100000",
        "run.checkpoint_interval=100000",
        *overrides,
    )


def metrics_by_step(run_dir):
    rows = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


@pytest.fixture(scope="module")
def zero2_run(ray_cluster, small_text, tmp_path_factory):
    from bigray.recipes.gpt import pretrain

    tmp = tmp_path_factory.mktemp("gpt")
    cfg = tiny_config(small_text, tmp, "zero2", "deepspeed.zero_stage=2")
    return cfg, pretrain(cfg)


def _assert_trained(summary, vocab_size):
    steps = metrics_by_step(summary["run_dir"])
    val = [steps[s]["val/loss"] for s in (10, 20, 30)]
    assert val[0] > val[1] > val[2], val
    assert val[2] < math.log(vocab_size) - 1.0  # well below the uniform guess
    assert steps[30]["train/loss"] < steps[1]["train/loss"] - 1.0
    for key in (
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/tokens_per_s_per_worker",
        "train/mfu",
        "train/tflops_per_worker",
        "train/step_time_s",
        "val/perplexity",
    ):
        assert key in steps[30]


def _shard_files(checkpoint):
    return sorted(p.name for p in Path(checkpoint, "deepspeed", "state").iterdir())


def test_zero2_trains_and_checkpoints_every_rank(zero2_run, small_text):
    cfg, summary = zero2_run
    _assert_trained(summary, small_text[1].vocab_size)
    ckpt = Path(summary["checkpoint"])
    assert ckpt.name == "checkpoint_step_0000030"
    meta = read_meta(ckpt, "gpt")
    assert meta.step == 30 and meta.world_size == 2 and meta.zero_stage == 2
    assert _shard_files(ckpt) == [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert sorted(p.name for p in (ckpt / "ranks").iterdir()) == ["rank_0.json", "rank_1.json"]
    run_dir = Path(summary["run_dir"])
    assert (run_dir / "config.yaml").is_file() and (run_dir / "summary.json").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_zero3_trains_and_serves_its_master_weights(ray_cluster, small_text, tmp_path):
    """(ZeRO-1 trains in tests/test_multi_node.py, the run that loses its node.)"""
    from safetensors.torch import load_file

    from bigray.recipes.gpt import pretrain
    from bigray.train.engine import fp32_weights

    summary = pretrain(
        tiny_config(small_text, tmp_path, "zero3", "deepspeed.zero_stage=3", "run.checkpoint_interval=30")
    )
    _assert_trained(summary, small_text[1].vocab_size)
    shards = _shard_files(summary["checkpoint"])
    for rank in (0, 1):  # parameters are partitioned too: each rank saves its own model states
        assert (
            f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in shards
            and f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" in shards
        )
    # the served weights (gathered parameter by parameter) are exactly the fp32 master weights
    served = load_file(str(Path(summary["checkpoint"], "model", "model.safetensors")))
    master = fp32_weights(summary["checkpoint"], 3)
    compared = [k for k in served if k in master]
    assert len(compared) >= 10
    for k in compared:
        assert torch.equal(served[k], master[k]), k


@pytest.mark.slow
def test_resume_continues_with_identical_losses(zero2_run, ray_cluster, small_text, tmp_path):
    from bigray.recipes.gpt import pretrain

    cfg, summary = zero2_run
    step20 = Path(summary["run_dir"]) / "checkpoint_step_0000020"
    before = hashlib.sha256((step20 / "bigray.json").read_bytes()).hexdigest()
    resumed_cfg = dataclasses.replace(
        cfg, resume_from=str(step20), run=dataclasses.replace(cfg.run, name="resumed", storage_path=str(tmp_path))
    )
    resumed = pretrain(resumed_cfg)
    full, part = metrics_by_step(summary["run_dir"]), metrics_by_step(resumed["run_dir"])
    assert min(part) == 21 and max(part) == 30  # continued at the next step
    for step in range(21, 31):
        assert part[step]["train/loss"] == pytest.approx(full[step]["train/loss"], abs=1e-5), step
        assert part[step]["train/lr"] == pytest.approx(full[step]["train/lr"], rel=1e-12)
    assert hashlib.sha256((step20 / "bigray.json").read_bytes()).hexdigest() == before


def _load_and_save(config):
    """On each Ray Train worker: load a checkpoint, save the whole weights (rank 0) and the state again."""
    import ray.train

    from bigray.config import from_dict
    from bigray.train.context import RayContext
    from bigray.train.engine import full_state_dict
    from bigray.train.gpt import GPTTrainer

    ctx = RayContext()
    trainer = GPTTrainer(from_dict(GPTPretrainConfig, config["job"]), ctx, config["data_dir"])
    trainer.load(config["checkpoint"])
    weights = full_state_dict(trainer.engine, ctx.is_main)  # a collective under ZeRO-3
    Path(config["out"]).mkdir(parents=True, exist_ok=True)
    if ctx.is_main:
        torch.save(weights, Path(config["out"], "weights.pt"))
    shutil.copytree(trainer.save({}), config["out"], dirs_exist_ok=True)  # the ranks' files side by side
    ray.train.report({"done": 1})


def _on_workers(n, loop, prepared, extra, tmp_path):
    """Run ``loop`` on ``n`` Ray Train workers with a prepared job's config and data."""
    import sys

    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer

    from bigray.config import to_dict

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules
    TorchTrainer(
        loop,
        train_loop_config={"job": to_dict(prepared.config), "data_dir": prepared.data_dir, **extra},
        scaling_config=ray.train.ScalingConfig(num_workers=n),
        run_config=ray.train.RunConfig(name=f"{loop.__name__}-{n}", storage_path=str(tmp_path)),
    ).fit()


@pytest.mark.slow
@pytest.mark.parametrize("stage, n", [(0, 1), (2, 1), (3, 4)])
def test_a_run_resumed_at_another_world_size_trains_on_the_same_windows(ray_cluster, small_text, tmp_path, stage, n):
    """The global batch is the contract: a 2-worker run resumed at step 10 on 1 worker (4 micro batches
    accumulated where 2 ranks took 2 each; ZeRO-0 and 2) or on 4 (one each; ZeRO-3) trains on the same windows in the same
    order, with the same dropout, as the uninterrupted run; ZeRO-2 and ZeRO-3 shards are re-partitioned
    through a Universal Checkpoint converted once beside the checkpoint. Weights and Adam state after
    the load are checked by what the next 10 steps do: losses may differ only by fp32 summation order
    (micro-batch means added on one rank vs all-reduced across several; measured <= 7e-8 relative over
    the 10 steps): 1e-6 relative (a wrong Adam step count, which ZeRO-3's universal loader gave, showed
    as 3e-5 from the second step on). And directly, for the re-sharded stages: what the 1 or 4 workers
    hold after the load equals the checkpoint's weights and Adam state within 1e-6."""
    from bigray.recipes.gpt import prepare_pretrain, pretrain
    from bigray.train.engine import fp32_weights, universal_state

    common = (
        f"deepspeed.zero_stage={stage}",
        "deepspeed.precision=fp32",
        "model.dropout=0.1",
        "train.micro_batch_size=4",
        "train.global_batch_size=16",
        "train.max_steps=20",
    )
    full = pretrain(tiny_config(small_text, tmp_path, "two", *common))
    step10 = Path(full["run_dir"]) / "checkpoint_step_0000010"
    two = metrics_by_step(full["run_dir"])
    assert {two[s]["train/world_size"] for s in two} == {2} and len({two[s]["train/windows"] for s in two}) == 20
    assert full["segments"] == [{"from_step": 0, "to_step": 20, "world_size": 2}]
    summary = pretrain(
        tiny_config(small_text, tmp_path, f"on{n}", *common, f"scaling.num_workers={n}", f"resume_from={step10}")
    )
    resumed = metrics_by_step(summary["run_dir"])
    assert sorted(resumed) == list(range(11, 21))
    for step in range(11, 21):
        assert resumed[step]["train/world_size"] == n
        assert resumed[step]["train/windows"] == two[step]["train/windows"], step
        assert resumed[step]["train/loss"] == pytest.approx(two[step]["train/loss"], rel=1e-6), step
    # validation covers the same windows at any world size (eval_batches counts over all workers)
    assert resumed[20]["val/loss"] == pytest.approx(two[20]["val/loss"], rel=1e-6)
    lost = summary["segments"][-1].pop("lost_s")  # seconds from the checkpoint to the first step after it
    assert summary["segments"] == [
        {"from_step": 0, "to_step": 10, "world_size": 2},
        {"from_step": 10, "to_step": 20, "world_size": n},
    ]
    assert lost > 0 and summary["resizes"] == [{"step": 10, "from": 2, "to": n, "seconds_lost": lost}]
    assert (step10 / "universal").is_dir() == (stage > 0)  # converted once, beside the checkpoint
    if stage == 0:  # ZeRO-0 loads the same whole files at any world size: the losses above are the check
        return
    # Directly: right after the load, what the n workers hold is the 2-worker checkpoint's, whole: the
    # weights, and (saved again at the new world size and converted) every parameter's fp32 copy and
    # Adam moments.
    local = prepare_pretrain(tiny_config(small_text, tmp_path, "local", *common))
    saved = fp32_weights(step10, stage)
    out = tmp_path / f"loaded-on-{n}"
    _on_workers(n, _load_and_save, local, {"checkpoint": str(step10), "out": str(out)}, tmp_path)
    loaded = torch.load(out / "weights.pt", weights_only=True)
    assert max((loaded[k] - w).abs().max().item() for k, w in saved.items()) < 1e-6
    again = universal_state(out) / "state" / "zero"
    for f in (step10 / "universal" / "state" / "zero").rglob("*.pt"):
        if f.parent.name != "zero":  # a parameter's fp32.pt, exp_avg.pt, exp_avg_sq.pt
            two_ranks, n_ranks = (torch.load(x, weights_only=True) for x in (f, again / f.relative_to(f.parents[1])))
            if isinstance(two_ranks, dict):  # ZeRO-1/2's universal files: {"param": tensor, ...}
                two_ranks, n_ranks = two_ranks["param"], n_ranks["param"]
            assert (two_ranks - n_ranks).abs().max().item() < 1e-6, f
    # a damaged conversion is refused, naming the file, and nothing is rewritten
    victim = sorted((step10 / "universal").rglob("*.pt"))[0]
    victim.write_bytes(victim.read_bytes()[:-8])
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in step10.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=r"Universal Checkpoint .*universal is incomplete \(state/.*\.pt is"):
        pretrain(tiny_config(small_text, tmp_path, "bad", *common, "scaling.num_workers=1", f"resume_from={step10}"))
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in step10.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_a_time_budget_ends_every_rank_together_and_resumes_on_another_world_size(ray_cluster, small_text, tmp_path):
    """train.max_minutes on 2 Ray workers: both ranks stop at the same step (the seconds are
    all-reduced; a rank that stopped alone would leave the other in a collective), and the run,
    resumed with a larger budget on 1 worker, counts on from the saved seconds."""
    from bigray.recipes.gpt import pretrain

    def budget(minutes, workers):
        return budget_config(
            small_text, tmp_path, minutes, "train.global_batch_size=16", f"scaling.num_workers={workers}"
        )

    two = pretrain(budget(0.1, 2))
    rows = metrics_by_step(two["run_dir"])
    stop = max(rows)
    assert rows[stop]["train/seconds"] >= 6.0 and rows[stop]["train/world_size"] == 2
    assert two["metrics"]["step"] == stop and two["segments"] == [{"from_step": 0, "to_step": stop, "world_size": 2}]
    one = pretrain(budget(0.2, 1))
    rows = metrics_by_step(one["run_dir"])
    assert rows[stop + 1]["train/world_size"] == 1
    assert rows[stop + 1]["train/seconds"] == pytest.approx(
        rows[stop]["train/seconds"] + rows[stop + 1]["train/step_time_s"]
    )
    assert rows[max(rows)]["train/seconds"] >= 12.0 and one["segments"][-1]["world_size"] == 1


def test_export_round_trip(zero2_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bigray.cli import main

    _, summary = zero2_run
    out = tmp_path / "hf"
    assert main(["export", summary["run_dir"], str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    trained = AutoModelForCausalLM.from_pretrained(Path(summary["checkpoint"]) / "model").eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("KING RICHARD III:\nNow is the winter of our discontent", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(exported(ids).logits, trained(ids).logits, atol=1e-4)
    generated = exported.generate(ids, max_new_tokens=12, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 12
    assert isinstance(tok.decode(generated[0, ids.shape[1] :]), str)
    # exporting into a non-empty directory is refused rather than overwriting it
    assert main(["export", summary["run_dir"], str(out)]) == 2


def test_bad_inputs_fail_before_training(ray_cluster, small_text, tmp_path, zero2_run):
    from bigray.recipes.gpt import pretrain

    with pytest.raises(ConfigError, match="256 positions"):
        pretrain(tiny_config(small_text, tmp_path, "b1", "model.block_size=512"))
    with pytest.raises(ConfigError, match="has no autoscaler.*scaling.use_gpu=false"):
        pretrain(tiny_config(small_text, tmp_path, "b2", "scaling.use_gpu=true"))
    with pytest.raises(CheckpointError, match="does not exist"):
        pretrain(tiny_config(small_text, tmp_path, "b3", f"resume_from={tmp_path}/nope"))
    _, summary = zero2_run
    ckpt = Path(summary["checkpoint"])
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in ckpt.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="ZeRO stage 2, this run 3"):
        pretrain(tiny_config(small_text, tmp_path, "b4", "deepspeed.zero_stage=3", f"resume_from={ckpt}"))
    with pytest.raises(
        ConfigError, match=r"train.micro_batch_size \(8\) x scaling.num_workers \(2\) = 16 must divide it"
    ):
        pretrain(tiny_config(small_text, tmp_path, "b5", "train.global_batch_size=24", f"resume_from={ckpt}"))
    # a re-run of a run name continues its own newest checkpoint, before any resume_from (the rule the
    # workers load by), so that is the one the driver checks: here it is refused as the run's own
    shutil.copytree(ckpt, tmp_path / "b6" / ckpt.name)
    with pytest.raises(
        CheckpointError, match="run.name 'b6' already holds .*ZeRO stage 2, this run 3.*pick a new run.name"
    ):
        pretrain(tiny_config(small_text, tmp_path, "b6", "deepspeed.zero_stage=3", f"resume_from={ckpt}"))
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in ckpt.rglob("*") if p.is_file()} == digest
    assert not (tmp_path / "b4").exists() and not (tmp_path / "b5").exists()


@pytest.mark.slow
def test_worker_refuses_missing_prepared_data(ray_cluster, small_text, tmp_path):
    """Ray Train workers open what the driver prepared; an unfinished preparation is an error, not a rebuild."""
    import shutil

    from bigray.recipes.gpt import PRETRAIN
    from bigray.recipes.launch import PreparedJob, TrainingFailed, build_trainer, raise_recorded_failure

    _, ds = small_text
    prepared = tmp_path / "prepared"
    shutil.copytree(ds.directory, prepared)
    (prepared / "manifest.json").unlink()  # the driver's preparation never finished
    before = sorted(p.name for p in prepared.iterdir())
    cfg = tiny_config(small_text, tmp_path, "nodata", "scaling.num_workers=1")
    trainer = build_trainer(PRETRAIN, PreparedJob(config=cfg, data_dir=str(prepared)))
    trainer.fit()  # the workers stop at once: no retry can fix missing data ...
    with pytest.raises(TrainingFailed, match="not retried.*never rebuild"):
        raise_recorded_failure(cfg)  # ... and the driver raises their reason
    assert sorted(p.name for p in prepared.iterdir()) == before


def test_the_schedule_of_a_time_budget_ends_where_the_measured_step_rate_says_it_runs_out():
    from bigray.config import GPTTrainConfig
    from bigray.train.optim import gpt_lr

    steps = GPTTrainConfig(max_steps=1000, lr=1e-3, min_lr_ratio=0.1, warmup_steps=10)
    budget = dataclasses.replace(steps, max_minutes=1.0, max_steps=10**6)
    assert gpt_lr(5, budget, 2.0) == gpt_lr(5, steps)  # warming up either way
    # 100 steps in 30 s of a 60 s budget: the run ends near step 200, so step 100 is mid-decay
    assert gpt_lr(100, budget, 30.0) == pytest.approx(gpt_lr(100, dataclasses.replace(steps, max_steps=200)))
    assert gpt_lr(300, budget, 61.0) == pytest.approx(1e-4)  # spent: the end of the decay
    # max_steps still ends the run (and its decay) when it comes first
    assert gpt_lr(100, dataclasses.replace(budget, max_steps=150), 30.0) == gpt_lr(
        100, dataclasses.replace(steps, max_steps=150)
    )


def test_a_time_budget_ends_the_run_with_its_decay_and_a_resume_spends_what_is_left(small_text, tmp_path):
    """train.max_minutes at world size 1: the run stops at the first step that takes its training
    steps' wall clock past the budget, with the learning rate decayed; the checkpoint records the
    seconds, and a resume (here with a larger budget) counts on from them at the saved step."""
    from bigray.recipes.gpt import train_local
    from bigray.train.optim import gpt_lr

    def local_budget(minutes):
        return budget_config(
            small_text, tmp_path, minutes, "train.warmup_steps=2", "scaling.num_workers=1", "scaling.cpus_per_worker=2"
        )

    run_dir = tmp_path / "budget"
    _, ctx = train_local(local_budget(0.05), str(run_dir))
    rows = metrics_by_step(run_dir)
    last = rows[max(rows)]
    assert last["train/seconds"] - last["train/step_time_s"] < 3.0 <= last["train/seconds"], last
    assert len(rows) > 5 and last["train/lr"] < 3e-4 + 0.15 * (3e-3 - 3e-4), last  # near lr * min_lr_ratio
    assert "val/loss" in last and len(ctx.checkpoints) == 1
    meta = read_meta(ctx.checkpoints[-1], "gpt")
    assert meta.step == last["step"] and meta.train_seconds == pytest.approx(last["train/seconds"])

    longer = local_budget(0.1)
    train_local(longer, str(run_dir))
    rows = metrics_by_step(run_dir)
    resumed = rows[meta.step + 1]
    assert resumed["train/seconds"] == pytest.approx(meta.train_seconds + resumed["train/step_time_s"])
    assert resumed["train/lr"] == pytest.approx(gpt_lr(meta.step, longer.train, meta.train_seconds))
    assert rows[max(rows)]["train/seconds"] >= 6.0 and max(rows) > meta.step + 5
