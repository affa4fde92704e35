"""Failures cost a restart, not the run: interrupted checkpoints are never loaded, divergence fails once.
(A killed worker replaying exactly from its checkpoint: tests/test_storage_runs.py; a lost node after a
truncated newest checkpoint: tests/test_multi_node.py.)"""

import json
import shutil
from pathlib import Path

import pytest

from bigray.artifacts.checkpoint import CheckpointError, latest_complete, read_meta
from bigray.config import load_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


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


def test_divergence_fails_once_whatever_max_failures_says(ray_cluster, fashion_mnist, tmp_path):
    from ray.util.state import list_actors

    from bigray.config import ResNetJobConfig
    from bigray.recipes.launch import TrainingFailed
    from bigray.recipes.resnet import train_resnet

    def workers_started() -> int:
        return len(list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=10_000))

    cfg = load_config(
        ResNetJobConfig,
        REPO / "jobs" / "configs" / "resnet_fashion.yaml",
        [
            "data.max_train_samples=256",
            "data.max_eval_samples=64",
            "train.epochs=3",
            "train.batch_size=32",
            "train.lr=1000000",
            "scaling.num_workers=2",
            "run.max_failures=3",
            f"run.storage_path={tmp_path}",
            "run.name=diverge",
        ],
    )
    before = workers_started()
    with pytest.raises(TrainingFailed, match="not retried.*training diverged: loss is"):
        train_resnet(cfg)
    assert workers_started() - before == 2  # one attempt of 2 workers, not 4 attempts
    assert json.loads((tmp_path / "diverge" / "failure.json").read_text())["reason"].startswith("FloatingPointError")
