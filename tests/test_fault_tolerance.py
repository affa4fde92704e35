"""Failures cost a restart, not the run: interrupted checkpoints, a kill after a truncated checkpoint, killed
replicas, divergence. (A killed worker replaying exactly from its checkpoint: tests/test_storage_runs.py.)"""

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from bigray.artifacts.checkpoint import CheckpointError, latest_complete, read_meta
from bigray.config import GPTPretrainConfig, load_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _rows(run_dir):
    path = Path(run_dir, "metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _gpt_config(small_text, tmp_path, *overrides):
    """The tiny GPT, checkpointing every 10 steps, allowed one worker-group restart."""
    text_cfg, _ = small_text
    return load_config(GPTPretrainConfig, REPO / "jobs" / "configs" / "gpt_tiny.yaml", [
        f"data.cache_dir={text_cfg.cache_dir}", f"data.max_chars={text_cfg.max_chars}", f"data.vocab_size={text_cfg.vocab_size}",
        "model.block_size=64", "train.micro_batch_size=8", "train.log_interval=1", "train.eval_interval=10",
        "train.eval_batches=2", "run.checkpoint_interval=10", "run.max_failures=1", f"run.storage_path={tmp_path}", *overrides,
    ])  # fmt: skip


def test_interrupted_checkpoint_is_never_loaded(gpt_checkpoint, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    older, newer = gpt_checkpoint[-2:]  # steps 20 and 40
    good = Path(shutil.copytree(older, run / older.name))
    newest = Path(shutil.copytree(newer, run / newer.name))
    # simulate a write cut short on one rank: its shard is truncated
    shard = next((newest / "deepspeed" / "state").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="incomplete"):
        read_meta(newest)
    assert latest_complete(run) == str(good)
    from bigray.artifacts.locate import resolve_checkpoint

    assert resolve_checkpoint(str(run)) == str(good)  # resuming from the run directory picks the complete one
    (newest / "ranks" / "rank_0.json").unlink()  # a rank that never finished writing
    with pytest.raises(CheckpointError, match="rank 0 never finished"):
        read_meta(newest)


def test_resume_after_a_kill_skips_a_truncated_newest_checkpoint(ray_cluster, small_text, tmp_path):
    """Ray restores its latest checkpoint, which was cut short: the run continues from the one before."""
    from ray.util.state import list_actors

    from bigray.recipes.gpt import pretrain

    cfg = _gpt_config(small_text, tmp_path, "train.max_steps=40", "run.keep_checkpoints=10", "run.name=truncated")
    result = {}
    runner = threading.Thread(target=lambda: result.update(pretrain(cfg)))
    runner.start()
    run_dir = tmp_path / "truncated"
    deadline = time.time() + 300
    while time.time() < deadline and _latest_registered(run_dir) != "checkpoint_step_0000020":
        time.sleep(0.05)  # Ray registered the step-20 checkpoint (its uploads are asynchronous), not yet the step-30 one
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert workers, "no live training worker to kill"
    newest = latest_complete(run_dir)
    assert newest is not None and Path(newest).name == "checkpoint_step_0000020", newest
    newest = Path(newest)
    shard = next((newest / "deepspeed" / "state").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])  # the newest checkpoint is cut short ...
    os.kill(workers[0].pid, signal.SIGKILL)  # ... and a worker dies before the next one
    runner.join(timeout=600)
    assert result, "the run did not finish after the worker was killed"
    assert read_meta(result["checkpoint"], "gpt")["step"] == 40
    steps = [r["step"] for r in _rows(run_dir)]
    assert steps.count(11) == 2, steps  # replayed from the step-10 checkpoint, the complete one before it
    assert steps[-1] == 40 and sorted(set(steps)) == list(range(1, 41))


def _latest_registered(run_dir: Path) -> str | None:
    """The checkpoint Ray Train registered last (what a restarted worker group gets), from the
    snapshot its controller keeps in the run directory."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):  # not written yet, or being replaced
        return None
    return latest.get("checkpoint_dir_name") if isinstance(latest, dict) else None


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file(), reason="needs dataset-fashion-mnist")
def test_divergence_fails_once_whatever_max_failures_says(ray_cluster, tmp_path):
    from ray.util.state import list_actors

    from bigray.config import ResNetJobConfig
    from bigray.recipes.launch import TrainingFailed
    from bigray.recipes.resnet import train_resnet

    def workers_started() -> int:
        return len(list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=10_000))

    cfg = load_config(ResNetJobConfig, REPO / "jobs" / "configs" / "resnet_fashion.yaml", [
        "data.max_train_samples=256", "data.max_eval_samples=64", "train.epochs=3", "train.batch_size=32",
        "train.lr=1000000", "scaling.num_workers=2", "run.max_failures=3", f"run.storage_path={tmp_path}", "run.name=diverge",
    ])  # fmt: skip
    before = workers_started()
    with pytest.raises(TrainingFailed, match="not retried.*training diverged: loss is"):
        train_resnet(cfg)
    assert workers_started() - before == 2  # one attempt of 2 workers, not 4 attempts
    assert json.loads((tmp_path / "diverge" / "failure.json").read_text())["reason"].startswith("FloatingPointError")
