"""ResNet training with DDP on a real local Ray cluster (2 CPU workers, Fashion-MNIST subset)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bigray.artifacts.checkpoint import read_meta
from bigray.config import ResNetJobConfig, load_config
from bigray.data.images import ArrayImages, DatasetInfo, load_images
from bigray.models.resnet import normalize

REPO = Path(__file__).resolve().parents[1]
needs_fmnist = pytest.mark.usefixtures("fashion_mnist")


def resnet_config(tmp_path, name, *overrides):
    return load_config(
        ResNetJobConfig,
        REPO / "jobs" / "configs" / "resnet_fashion.yaml",
        [
            "data.max_train_samples=1600",
            "data.max_eval_samples=1000",
            "train.epochs=2",
            "train.batch_size=16",
            "train.lr=0.2",
            "train.augment=true",
            "train.precision=auto",  # bf16 where the CPU has bf16 units; emulated bf16 is ~10x slower
            f"run.storage_path={tmp_path}",
            f"run.name={name}",
            *overrides,
        ],
    )


def metrics_by_epoch(run_dir):
    return {m["epoch"]: m for m in map(json.loads, Path(run_dir, "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def ddp_run(ray_cluster, tmp_path_factory):
    from bigray.recipes.resnet import train_resnet

    cfg = resnet_config(tmp_path_factory.mktemp("resnet"), "ddp")
    return cfg, train_resnet(cfg)


@needs_fmnist
@pytest.mark.slow
def test_ddp_reaches_accuracy_well_above_chance(ddp_run):
    cfg, summary = ddp_run
    epochs = metrics_by_epoch(summary["run_dir"])
    assert epochs[2]["step"] == 100  # 1600 images / (2 workers x 16) x 2 epochs
    assert epochs[2]["val/acc"] > 0.6, epochs[2]  # chance is 0.1
    assert epochs[2]["train/loss"] < epochs[1]["train/loss"]
    for key in ("train/loss", "val/loss", "val/acc", "train/images_per_s", "train/epoch_time_s"):
        assert key in summary["metrics"]
    meta = read_meta(summary["checkpoint"], "resnet")
    assert meta.epoch == 2
    assert summary["segments"] == meta.segments == [{"from_step": 0, "to_step": 100, "world_size": 2}]
    card = json.loads(Path(summary["checkpoint"], "model", "model.json").read_text())
    assert card["data"]["class_names"][9] == "Ankle boot" and card["data"]["mean"] == [0.286]


@needs_fmnist
@pytest.mark.slow
def test_a_run_resumed_on_another_world_size_trains_on_the_same_images(ddp_run, tmp_path):
    """ddp_run (2 workers x 16) resumed after epoch 1 on 1 worker at the same global batch (32): epoch 2
    trains on the same images in the same order, with the same augmentation and learning rate (it
    follows the global batch), as the uninterrupted run. Its loss differs through BatchNorm alone, whose
    statistics are each worker's batch (32 images on one worker, 16 on each of two): within 5% relative."""
    from bigray.recipes.resnet import train_local
    from bigray.train.optim import resnet_peak_lr

    cfg, summary = ddp_run
    epoch1 = Path(summary["run_dir"]) / "checkpoint_epoch_0001"
    one = resnet_config(
        tmp_path,
        "one",
        "train.batch_size=0",
        "train.global_batch_size=32",
        "scaling.num_workers=1",
        "scaling.cpus_per_worker=2",
        f"resume_from={epoch1}",
    )
    assert resnet_peak_lr(one.train, 32) == resnet_peak_lr(cfg.train, 2 * cfg.train.batch_size) == pytest.approx(0.05)
    train_local(one, str(tmp_path / "resumed"))
    resumed, full = metrics_by_epoch(tmp_path / "resumed"), metrics_by_epoch(summary["run_dir"])
    assert list(resumed) == [2] and resumed[2]["step"] == full[2]["step"] == 100
    assert (resumed[2]["train/world_size"], full[2]["train/world_size"]) == (1, 2)
    assert resumed[2]["train/images"] == full[2]["train/images"]
    assert resumed[2]["train/loss"] == pytest.approx(full[2]["train/loss"], rel=0.05), (resumed[2], full[2])
    meta = read_meta(tmp_path / "resumed" / "checkpoint_epoch_0002", "resnet")
    assert meta.segments[-1].pop("lost_s") > 0  # seconds from the checkpoint to the first step after it
    assert meta.segments == [
        {"from_step": 0, "to_step": 50, "world_size": 2},
        {"from_step": 50, "to_step": 100, "world_size": 1},
    ]


@needs_fmnist
@pytest.mark.slow
def test_resume_continues_at_saved_epoch_with_optimizer_state(ddp_run, ray_cluster, s3_server):
    """Resumed from a checkpoint in a bucket into a run directory in the bucket (the real S3 API)."""
    import boto3

    from bigray.artifacts.runs import read_metrics
    from bigray.artifacts.storage import upload
    from bigray.recipes.resnet import train_resnet

    cfg, summary = ddp_run
    epoch1 = Path(summary["run_dir"]) / "checkpoint_epoch_0001"
    assert torch.load(epoch1 / "train_state.pt", weights_only=True)["optimizer"]["state"]  # momentum buffers saved
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="resnet-e2e")
    upload(epoch1, "s3://resnet-e2e/saved/checkpoint_epoch_0001")
    resumed_cfg = dataclasses.replace(
        cfg,
        resume_from="s3://resnet-e2e/saved/checkpoint_epoch_0001",
        run=dataclasses.replace(cfg.run, name="resumed", storage_path="s3://resnet-e2e/runs"),
    )
    out = train_resnet(resumed_cfg)
    assert out["run_dir"] == "s3://resnet-e2e/runs/resumed" and out["checkpoint"].startswith(
        "s3://resnet-e2e/runs/resumed/"
    )
    assert read_meta(out["checkpoint"], "resnet").epoch == 2
    resumed = {m["epoch"]: m for m in read_metrics(out["run_dir"])}
    full = metrics_by_epoch(summary["run_dir"])
    assert list(resumed) == [2]  # continued at the saved epoch
    assert resumed[2]["step"] == full[2]["step"]
    # the same weights, momentum, data order and augmentation give the same epoch
    assert resumed[2]["train/loss"] == pytest.approx(full[2]["train/loss"], abs=1e-4)
    assert resumed[2]["val/acc"] == pytest.approx(full[2]["val/acc"], abs=2e-3)


@needs_fmnist
def test_checkpoint_loads_into_fresh_model_with_same_predictions(tmp_path):
    from bigray.artifacts.resnet_card import load_classifier
    from bigray.train.context import LocalContext
    from bigray.train.resnet import ResNetTrainer

    cfg = resnet_config(
        tmp_path,
        "local",
        "data.max_train_samples=320",
        "data.max_eval_samples=200",
        "train.epochs=1",
        "train.precision=fp32",
        "scaling.num_workers=1",
    )
    trainer = ResNetTrainer(cfg, LocalContext(str(tmp_path)), str(tmp_path))
    trainer.run()
    ckpt = sorted(tmp_path.glob("checkpoint_epoch_*"))[-1]
    loaded, card = load_classifier(ckpt)
    splits, _ = load_images(cfg.data)
    images = splits["test"].images[:64]
    with torch.no_grad():
        x = normalize(images, card["data"]["mean"], card["data"]["std"])
        trained_logits = trainer.model.eval()(x)
        loaded_logits = loaded(x)
    assert torch.equal(trained_logits.argmax(1), loaded_logits.argmax(1))
    assert torch.allclose(trained_logits, loaded_logits, atol=1e-5)


@pytest.mark.slow
def test_ranks_see_distinct_samples_every_epoch(ray_cluster, tmp_path):
    import sys

    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer

    from bigray.config import to_dict
    from bigray.data.order import epoch_permutation

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules
    results = tmp_path / "seen"
    results.mkdir()

    cfg = resnet_config(tmp_path, "ids", "train.batch_size=4", "train.augment=false")
    trainer = TorchTrainer(
        _sharding_loop_and_save,
        train_loop_config={"job": to_dict(cfg), "n": 64, "out": str(results)},
        scaling_config=ray.train.ScalingConfig(num_workers=2),
        run_config=ray.train.RunConfig(name="ids", storage_path=str(tmp_path)),
    )
    trainer.fit()
    seen = [json.loads((results / f"rank_{r}.json").read_text()) for r in range(2)]
    for epoch in range(2):
        a, b = sum(seen[0][epoch], []), sum(seen[1][epoch], [])
        assert len(a) == 32 and len(b) == 32
        assert not set(a) & set(b) and set(a) | set(b) == set(range(64))
        # step s is samples [8s, 8s + 8) of the epoch's permutation, rank r its r-th half: one
        # worker taking 8 images a step would train on the same images in the same order
        order = epoch_permutation(cfg.train.seed, epoch, 64).tolist()
        assert [x for step in zip(seen[0][epoch], seen[1][epoch]) for part in step for x in part] == order
    assert seen[0][0] != seen[0][1]  # reshuffled each epoch


def _sharding_loop_and_save(config):
    import ray.train

    from bigray.config import from_dict
    from bigray.train.context import RayContext
    from bigray.train.resnet import ResNetTrainer

    n = config["n"]
    images = np.zeros((n, 8, 8), dtype=np.uint8)
    splits = {"train": ArrayImages(images, np.arange(n)), "test": ArrayImages(images[:4], np.arange(4))}
    info = DatasetInfo("ids", [str(i) for i in range(n)], 1, 8, [0.5], [0.5], hflip=False)
    ctx = RayContext()
    trainer = ResNetTrainer(from_dict(ResNetJobConfig, config["job"]), ctx, None, splits, info)
    seen = []
    for epoch in range(2):
        trainer.batches.set_epoch(epoch)
        seen.append([[int(i) for i in labels] for _, labels in trainer.train_loader])
    Path(config["out"], f"rank_{ctx.rank}.json").write_text(json.dumps(seen))
    ray.train.report({"done": 1})


def test_bad_data_root_fails_before_ray(tmp_path, capsys):
    from bigray.cli import main

    code = main(["train-resnet", "--set", "data.dataset=imagefolder", "--set", f"data.root={tmp_path}/missing"])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
    one = tmp_path / "one"
    for split in ("train", "test"):
        (one / split / "cat").mkdir(parents=True)
    assert main(["train-resnet", "--set", "data.dataset=imagefolder", "--set", f"data.root={one}"]) == 2
    assert "1 class folder" in capsys.readouterr().err
    assert main(["train-resnet", "--set", "train.batch_size=-1"]) == 2
    assert "train.batch_size" in capsys.readouterr().err
    # a global batch is split equally over the workers, or refused naming both keys
    assert main(["train-resnet", "--set", "train.global_batch_size=33"]) == 2
    assert "'train.global_batch_size': 33 images do not split over scaling.num_workers (2)" in capsys.readouterr().err


def test_augment_crops_and_flips_each_image_by_its_own_draw():
    from bigray.train.resnet import augment, augment_draws

    images = torch.arange(3 * 2 * 5 * 5, dtype=torch.uint8).view(3, 2, 5, 5)
    info = DatasetInfo("x", ["a", "b"], channels=2, image_size=5, mean=[0.0, 0.0], std=[1.0, 1.0], hflip=True)
    dy, dx, flip = augment_draws(seed=7, step=3, global_batch=6, part=slice(3, 6))
    out = augment(images, info, (dy, dx, flip))
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(3):
        expected = padded[i, :, dy[i] : dy[i] + 5, dx[i] : dx[i] + 5]
        assert torch.equal(out[i], expected.flip(-1) if flip[i] else expected), i
    assert out.shape == images.shape and out.dtype == torch.uint8
    # an image's draws are those of its place in the step's global batch, whoever augments it
    whole = augment_draws(seed=7, step=3, global_batch=6, part=slice(0, 6))
    assert all(torch.equal(a, b[3:]) for a, b in zip((dy, dx, flip), whole))
    assert not torch.equal(whole[0], augment_draws(seed=7, step=4, global_batch=6, part=slice(0, 6))[0])


def test_an_automatic_batch_gives_short_runs_their_steps_and_full_runs_the_full_data_recipe():
    from bigray.config import ResNetTrainConfig
    from bigray.train.optim import resnet_peak_lr
    from bigray.train.resnet import MIN_STEPS, global_batch

    def auto(images, epochs, workers):
        return global_batch(ResNetTrainConfig(epochs=epochs), images, workers)

    assert auto(60_000, 2, 2) == auto(60_000, 2, 1) == 128  # the full-data recipe: lr 0.1, any world size
    assert auto(4_000, 2, 2) == auto(4_000, 2, 1) == 32 and 4_000 * 2 // 32 >= MIN_STEPS
    assert auto(2_000, 1, 2) == 16  # BatchNorm's floor, 8 per worker, even if the run then has fewer steps
    assert auto(2_000, 1, 4) == 32 and auto(60_000, 2, 3) == 126  # whole images per worker
    assert global_batch(ResNetTrainConfig(batch_size=16), 4_000, 3) == 48
    assert global_batch(ResNetTrainConfig(global_batch_size=96), 4_000, 3) == 96
    t = ResNetTrainConfig()
    assert t.batch_size == 0 and resnet_peak_lr(t, 128) == 0.1 and resnet_peak_lr(t, 32) == pytest.approx(0.025)
