"""Elastic training (scaling.num_workers a range) on a real multi-node Ray cluster on this machine
(tests/scripts/elastic.py, in its own process): a GPT run on [1, 2] workers loses a node (at once, or
after a spot interruption notice it checkpoints on), continues on the worker that remains, gets a
node back and grows to 2 again, and trains on exactly the windows an uninterrupted run trains on; a
ResNet DDP run the same way, on the same images. The notice source against a local
instance metadata endpoint. Config refusals: tests/test_config.py."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent / "scripts"
SCRIPT = SCRIPTS / "elastic.py"


def run_elastic(out: Path, downloads: Path, text_cfg, stage: int, how: str, *options: str) -> dict:
    """tests/scripts/elastic.py in its own process; its record of both runs."""
    data = [text_cfg.cache_dir, str(text_cfg.max_chars), str(text_cfg.vocab_size)] if text_cfg else ["-", "0", "0"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(downloads), *data, str(stage), how, *options],
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"elastic"')]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1])["elastic"]


def assert_shrunk_and_grew(run: dict, last: int) -> list[dict]:
    """The run finished at ``last`` on 2 workers, then the one that remained (from the newest checkpoint
    Ray had registered), then 2 again, and summary.json names both resizes and what each cost;
    returns its segments."""
    assert run["finished"], {k: run.get(k) for k in ("error", "stuck_at")}
    segments = run["summary"]["segments"]
    assert [s["world_size"] for s in segments] == [2, 1, 2], segments
    assert segments[0]["from_step"] == 0 and segments[-1]["to_step"] == last
    assert all(a["to_step"] == b["from_step"] for a, b in zip(segments, segments[1:])), segments
    resizes = run["summary"]["resizes"]
    assert [(r["step"], r["from"], r["to"]) for r in resizes] == [
        (segments[1]["from_step"], 2, 1),
        (segments[2]["from_step"], 1, 2),
    ]
    assert all(r["seconds_lost"] > 0 for r in resizes), resizes
    return segments


def planned(run: dict) -> dict[int, int]:
    """The digest of what each step (epoch) of an uninterrupted run trains on, as the script computed it."""
    return {int(k): v for k, v in run["planned"].items()}


def instance_metadata():
    spec = importlib.util.spec_from_file_location("multi_node", SCRIPTS / "multi_node.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.InstanceMetadata()


def test_the_aws_notice_source_reads_the_spot_interruption_time(monkeypatch):
    import socket

    from bigray.cluster import aws_spot_notice

    endpoint = instance_metadata()
    try:
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", endpoint.url)
        assert aws_spot_notice() is None  # no interruption scheduled: a 404
        at = int(time.time()) + 120
        endpoint.interrupt(at)
        assert aws_spot_notice() == at
    finally:
        endpoint.close()
    with socket.socket() as sock:  # nothing listens there: not on EC2
        sock.bind(("127.0.0.1", 0))
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://127.0.0.1:{sock.getsockname()[1]}")
    with pytest.raises(OSError):
        aws_spot_notice()


@pytest.mark.slow
@pytest.mark.parametrize("stage, how, last", [(2, "lost", 150), (3, "noticed", 200)])
def test_a_run_on_a_worker_range_shrinks_when_a_node_goes_and_grows_when_one_comes(
    small_text, downloads_dir, tmp_path, stage, how, last
):
    """Enough steps for the one worker to train on while the node comes back and Ray grows the run."""
    run = run_elastic(tmp_path, downloads_dir, small_text[0], stage, how, f"--steps={last}")
    segments = assert_shrunk_and_grew(run, last)
    assert segments[1]["to_step"] - segments[1]["from_step"] >= 5, segments  # trained on one worker
    # every step trained on the windows an uninterrupted run trains on (losses at another world size:
    # tests/test_gpt.py's resumed runs)
    rows = {r["step"]: r for r in run["rows"]}  # a replayed step's later row is the one the run kept
    assert sorted(rows) == list(range(1, last + 1))
    assert {step: r["train/windows"] for step, r in rows.items()} == planned(run)
    assert {r["train/world_size"] for r in run["rows"]} == {1, 2}
    if how == "noticed":
        # the notice reached the run, which saved a checkpoint at once (not a multiple of
        # run.checkpoint_interval, 25) and continued from it on one worker: no steps lost
        notices = {r["step"]: r["preemption/deadline_s"] for r in run["rows"] if "preemption/deadline_s" in r}
        assert len(notices) == 1, notices
        (step, left), lost_after = next(iter(notices.items())), run["lost_after"]
        assert 0 < left <= 30 and lost_after < step < 50 and step % 25, (notices, lost_after)
        assert segments[0]["to_step"] == segments[1]["from_step"] == step, segments
    print({k: run[k] for k in ("lost_after", "loss_to_next_step_s", "return_to_next_step_s")})


@pytest.mark.slow
def test_a_resnet_run_on_a_worker_range_shrinks_and_grows_on_the_images_of_an_uninterrupted_run(
    fashion_mnist, downloads_dir, tmp_path
):
    """ResNet DDP, 3 epochs on [1, 2] workers: the node of one worker goes once the epoch-1 checkpoint
    is registered; one worker trains epoch 2; a node comes back and 2 workers finish."""
    run = run_elastic(
        tmp_path, downloads_dir, None, 0, "lost", "--job=resnet", "--interval=1", "--lose-after=1", "--steps=3"
    )
    segments = assert_shrunk_and_grew(run, 3 * 640 // 32)  # steps: 640 images an epoch, global batch 32
    epochs = {r["epoch"]: r for r in run["rows"]}  # a replayed epoch's later row is the one the run kept
    assert sorted(epochs) == [1, 2, 3]
    # every epoch on the images of an uninterrupted run, in the same order, at either world size
    assert {e: r["train/images"] for e, r in epochs.items()} == planned(run)
    assert {r["train/world_size"] for r in run["rows"]} == {1, 2}
    assert epochs[3]["train/loss"] < epochs[1]["train/loss"], epochs
    print(segments, {k: run[k] for k in ("lost_after", "loss_to_next_step_s", "return_to_next_step_s")})
