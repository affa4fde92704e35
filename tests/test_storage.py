"""Object storage end to end against a real S3 HTTP API (moto's server on 127.0.0.1, see conftest):
locations keep their scheme, checkpoints and prepared data are found, checked and copied from the
bucket, and bad locations or damaged objects are refused by name."""

import json
import logging
import shutil
import socket
from pathlib import Path

import pytest

from bigray.artifacts.checkpoint import CheckpointError
from bigray.artifacts.storage import StorageError


@pytest.fixture
def node_cache(tmp_path, monkeypatch):
    """This process's node-local cache (BIGRAY_CACHE_DIR), fresh per test."""
    cache = tmp_path / "node-cache"
    monkeypatch.setenv("BIGRAY_CACHE_DIR", str(cache))
    return cache


def downloads(cache: Path) -> list[dict]:
    log = cache / "downloads.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def put_tree(local: Path, location: str) -> str:
    from bigray.artifacts.storage import upload

    upload(local, location)
    return location


def test_locations_keep_their_scheme_and_options():
    from bigray.artifacts.storage import full_uri, join, name_of, parent

    uri = "s3://bkt/runs?endpoint_override=http://127.0.0.1:9000&scheme=http"
    run = join(uri, "gpt", "checkpoint_000001")
    assert run == "s3://bkt/runs/gpt/checkpoint_000001?endpoint_override=http://127.0.0.1:9000&scheme=http"
    assert name_of(run) == "checkpoint_000001" and parent(run) == join(uri, "gpt")
    # Ray reports checkpoint paths relative to their filesystem: bigray records them with the scheme back on.
    assert full_uri(uri, "bkt/runs/gpt/checkpoint_000001") == run
    assert full_uri("file:///tmp/runs", "/tmp/runs/x") == "file:///tmp/runs/x"
    assert full_uri("/local/runs", "/local/runs/x") == "/local/runs/x"


def test_bad_locations_are_named_in_one_clear_error(bucket):
    from bigray.artifacts.locate import resolve_checkpoint
    from bigray.artifacts.storage import read_text

    with pytest.raises(StorageError, match=f"{bucket}/nothing/here.txt does not exist"):
        read_text(f"{bucket}/nothing/here.txt")
    with pytest.raises(CheckpointError, match=f"checkpoint {bucket}/no-such-run does not exist"):
        resolve_checkpoint(f"{bucket}/no-such-run")
    with socket.socket() as s:  # a port nothing listens on: an unreachable endpoint
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    unreachable = f"s3://{bucket[5:]}/x.txt?endpoint_override=http://127.0.0.1:{dead}"
    with pytest.raises(StorageError, match=r"cannot read s3://.*x\.txt.*check the endpoint"):
        read_text(unreachable)
    with pytest.raises(StorageError, match="cannot use storage location nosuch://"):
        read_text("nosuch://bucket/x")


def test_checkpoint_in_a_bucket_is_found_checked_and_copied_once(bucket, gpt_checkpoint, node_cache, caplog):
    from bigray.artifacts.checkpoint import latest_complete, read_meta
    from bigray.artifacts.locate import local_checkpoint, resolve_checkpoint
    from bigray.artifacts.storage import delete_file, join, write_text

    run = f"{bucket}/runs/gpt"
    older = put_tree(gpt_checkpoint[0], join(run, gpt_checkpoint[0].name))
    newest = put_tree(gpt_checkpoint[-1], join(run, gpt_checkpoint[-1].name))
    write_text(join(run, "summary.json"), json.dumps({"checkpoint": newest}))
    assert resolve_checkpoint(join(run, "summary.json")) == newest
    assert resolve_checkpoint(run) == newest
    assert read_meta(newest, "gpt").step == 40

    local = local_checkpoint(run, "gpt")
    assert (local / "deepspeed").is_dir() and read_meta(local, "gpt").step == 40
    assert local_checkpoint(newest, "gpt") == local and len(downloads(node_cache)) == 1  # reused, not fetched again

    delete_file(join(newest, "ranks", "rank_0.json"))  # the newest is now incomplete in the bucket
    with caplog.at_level(logging.WARNING):
        assert latest_complete(run, "gpt") == older
        assert resolve_checkpoint(join(run, "summary.json")) == older  # the summary's checkpoint falls back
    assert "rank 0 never finished writing" in caplog.text
    with pytest.raises(CheckpointError, match="rank 0 never finished writing"):
        read_meta(newest, "gpt")


def test_serving_copies_only_the_model_and_releases_it(bucket, gpt_checkpoint, node_cache):
    from bigray.artifacts.locate import served_model
    from bigray.artifacts.storage import join

    ckpt = put_tree(gpt_checkpoint[-1], join(f"{bucket}/runs/gpt", gpt_checkpoint[-1].name))
    served = served_model(ckpt, "gpt")
    assert (served.model_dir / "model.safetensors").is_file() and (served.model_dir / "config.json").is_file()
    assert not (served.directory / "deepspeed").exists()  # the ZeRO shards stay in the bucket
    # a restart reuses it
    assert served_model(ckpt, "gpt").directory == served.directory and len(downloads(node_cache)) == 1
    served.release()
    assert not served.directory.exists()
    with pytest.raises(CheckpointError, match="is a gpt checkpoint, not a resnet checkpoint"):
        served_model(ckpt, "resnet")


def test_export_reads_from_and_writes_to_a_bucket(bucket, gpt_checkpoint, node_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    from bigray.artifacts.storage import cached_copy, file_sizes, join, read_text
    from bigray.export import export_gpt

    ckpt = put_tree(gpt_checkpoint[-1], join(f"{bucket}/runs/gpt", gpt_checkpoint[-1].name))
    out = f"{bucket}/exports/gpt-hf"
    info = export_gpt(ckpt, out)
    assert info["step"] == 40 and info["checkpoint"] == ckpt
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(file_sizes(out))
    AutoModelForCausalLM.from_pretrained(str(cached_copy(out)))
    export_gpt(ckpt, str(tmp_path / "local-hf"))
    assert (tmp_path / "local-hf" / "model.safetensors").is_file()
    before = read_text(join(out, "config.json"))
    with pytest.raises(CheckpointError, match="is not empty"):
        export_gpt(ckpt, out)  # nothing already in the bucket is overwritten
    assert read_text(join(out, "config.json")) == before


def test_prepared_data_in_a_bucket_is_opened_per_node_and_damage_is_named(bucket, downloads_dir, node_cache):
    import numpy as np

    from bigray.artifacts.storage import file_sizes, join, read_bytes, write_bytes
    from bigray.config import TextDataConfig
    from bigray.data.cache import DataError
    from bigray.data.text import open_prepared, prepare_text

    node_cache.mkdir(parents=True)
    (node_cache / "downloads").symlink_to(downloads_dir)
    cfg = TextDataConfig(cache_dir=f"{bucket}/data", max_chars=150_000, vocab_size=300)
    dataset, stats = prepare_text(cfg)
    location = stats["location"]
    assert location.startswith(f"{bucket}/data/text/") and dataset.location == location
    assert {"manifest.json", "train.bin", "val.bin", "tokenizer/tokenizer.json"} <= set(file_sizes(location))
    assert prepare_text(cfg)[1]["cached"] is True  # the bucket's copy is reused, not rebuilt

    shutil.rmtree(node_cache / "copies", ignore_errors=True)
    shutil.rmtree(node_cache / "data", ignore_errors=True)
    shutil.rmtree(node_cache / "staging", ignore_errors=True)  # the driver's local data is gone
    reopened = open_prepared(location)
    assert np.array_equal(np.asarray(reopened.tokens("val")), np.asarray(dataset.tokens("val")))

    train = bytearray(read_bytes(join(location, "train.bin")))
    train[100] ^= 0xFF  # one flipped byte, same size: only the checksum can tell
    write_bytes(join(location, "train.bin"), bytes(train))
    shutil.rmtree(node_cache / "data")
    with pytest.raises(DataError, match=r"train\.bin does not match its checksum"):
        open_prepared(location)
    write_bytes(join(location, "val.bin"), read_bytes(join(location, "val.bin"))[:-8])  # cut short
    with pytest.raises(DataError, match=r"is damaged: val\.bin has"):
        prepare_text(cfg)  # refused, never rebuilt over what is in the bucket


def test_commands_refuse_a_missing_or_unreachable_location_with_one_line(bucket, capsys, tmp_path):
    from bigray.cli import main

    assert main(["serve", "--gpt", f"{bucket}/runs/none"]) == 2  # before any Ray or Serve work
    assert f"bigray: checkpoint error: checkpoint {bucket}/runs/none does not exist" in capsys.readouterr().err
    assert main(["export", f"{bucket}/runs/none", str(tmp_path / "out")]) == 2
    assert f"{bucket}/runs/none does not exist" in capsys.readouterr().err
    assert main(["export", "nosuch://x/y", str(tmp_path / "out")]) == 2
    assert "bigray: storage error: cannot use storage location nosuch://x/y" in capsys.readouterr().err


def test_missing_aws_credentials_are_named_before_any_request(bucket, monkeypatch, capsys, tmp_path):
    from bigray.artifacts import storage
    from bigray.cli import main

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    storage._aws_credentials_found.cache_clear()
    try:
        assert main(["export", f"{bucket}/runs/gpt", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert f"no AWS credentials found for {bucket}/runs/gpt: set AWS_ACCESS_KEY_ID" in err, err
        assert not (tmp_path / "out").exists()
        with pytest.raises(StorageError, match="no AWS credentials found for s3://"):
            storage.read_text(f"{bucket}/x.txt")
    finally:
        storage._aws_credentials_found.cache_clear()


def test_imagefolder_root_in_a_bucket_is_copied_once_and_read(bucket, node_cache, tmp_path):
    import numpy as np
    from PIL import Image

    from bigray.config import ImageDataConfig
    from bigray.data.cache import DataError
    from bigray.data.images import load_images

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (tmp_path / "images" / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                    tmp_path / "images" / split / c / f"{i}.png"
                )
    root = put_tree(tmp_path / "images", f"{bucket}/images")
    splits, info = load_images(ImageDataConfig(dataset="imagefolder", root=root))
    assert (
        info.class_names == ["cat", "dog"] and len(splits["train"]) == 6 and splits["train"][0][0].shape == (3, 16, 16)
    )
    load_images(ImageDataConfig(dataset="imagefolder", root=root))
    assert [d["location"] for d in downloads(node_cache)] == [root]  # copied to this node once
    with pytest.raises(DataError, match=f"data.root: {bucket}/nothing does not exist"):
        load_images(ImageDataConfig(dataset="imagefolder", root=f"{bucket}/nothing"))


def test_fashion_mnist_root_in_a_bucket_is_copied_once_and_read(bucket, node_cache):
    """A cluster's Tune trials read Fashion-MNIST from the bucket (jobs/configs/tune_resnet_cluster.yaml):
    the four idx files the operator uploaded, copied to each node once."""
    from bigray.config import ImageDataConfig
    from bigray.data.cache import DataError
    from bigray.data.images import DEBIAN_FASHION_MNIST, load_images

    root = put_tree(DEBIAN_FASHION_MNIST, f"{bucket}/fashion-mnist")
    cfg = ImageDataConfig(dataset="fashion_mnist", root=root, max_train_samples=100, max_eval_samples=50, download=True)
    splits, info = load_images(cfg)
    assert info.name == "fashion_mnist" and len(splits["train"]) == 100 and len(splits["test"]) == 50
    load_images(cfg)
    assert [d["location"] for d in downloads(node_cache)] == [root]  # copied to this node once
    with pytest.raises(DataError, match=f"data.root: {bucket}/nothing does not exist"):
        # never downloaded into a URI
        load_images(ImageDataConfig(dataset="fashion_mnist", root=f"{bucket}/nothing", download=True))


def test_every_node_is_probed_for_the_job_locations_with_its_own_credentials(ray_cluster, bucket, tmp_path):
    """What a job's driver runs before asking for workers on a cluster of several nodes (here, on
    this session's one node): versions, and each location read and written from the node."""
    from bigray.recipes.preflight import MARKER_DIR, probe_nodes

    found = {
        f.check: f
        for f in probe_nodes({"run.storage_path": f"{bucket}/runs", "data.cache_dir": str(tmp_path / "data")})
    }
    node_checks = [name for name in found if name.startswith("node ")]
    assert all(f.ok for f in found.values()) and len(node_checks) == 3, found  # versions, then both locations
    assert not (tmp_path / "data" / MARKER_DIR).exists()  # the markers are removed
    missing = probe_nodes({"run.storage_path": "s3://no-such-bucket/runs"})
    bad = [f for f in missing if not f.ok]
    assert [f.check for f in bad] == ["run.storage_path writable from the driver"] and "no-such-bucket" in bad[
        0
    ].detail, missing


def test_storage_calls_refuse_credentials_in_a_location_without_echoing_them(tmp_path):
    from bigray.artifacts.storage import filesystem, read_text

    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    for uri in (
        f"s3://AKIAEXAMPLE:{secret}@bucket/x.txt",
        f"s3://bucket/x.txt?access_key=AKIAEXAMPLE&secret_key={secret}",
    ):
        for call in (filesystem, read_text):
            with pytest.raises(StorageError, match="holds credentials") as err:
                call(uri)
            assert secret not in str(err.value)
