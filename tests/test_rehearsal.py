"""README's "Running on a cluster", rehearsed on this machine (tests/scripts/rehearsal.py): its
commands in order, as written, on a 3-node Ray cluster started with `ray start` (token auth on)
whose nodes share no data, cache or run directory, with the S3 API server on loopback as the only
shared storage: the cluster check, the bandwidth and ZeRO-3 smoke, pretraining (data prepared
into the bucket), the images
uploaded, a Tune search, the Serve job, then requests to the endpoint with and without the key.
Given a local data directory, the same rehearsal stops at the pretraining step, which names it."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parent / "scripts" / "rehearsal.py"


def rehearse(out: Path, downloads: Path, bucket: str, *extra: str) -> dict:
    import boto3

    boto3.client("s3").create_bucket(Bucket=bucket)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(downloads), bucket, *extra],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"steps"')]
    assert lines, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(lines[-1])


def test_readme_cluster_commands_pass_in_order_on_nodes_that_share_only_a_bucket(s3_server, downloads_dir, tmp_path):
    result = rehearse(tmp_path / "rehearsal", downloads_dir, "rehearsal")
    steps = result["steps"]
    failed = [s for s in steps if not s["ok"]]
    assert not failed, json.dumps(failed, indent=1)[-6000:]
    names = [s["step"] for s in steps]
    assert names[names.index("ray up") :] == [
        "ray up",
        "bigray cluster check",
        "bigray cluster smoke",
        "jobs/pretrain_gpt.py",
        "aws s3 cp",
        "jobs/tune.py",
        "jobs/serve_app.py",
    ], names
    check = next(s for s in steps if s["step"] == "bigray cluster check")["output"]
    assert (
        '"cluster_check": "passed"' in check and check.count("reads and writes run.storage_path: s3://rehearsal/") == 3
    ), check[-3000:]
    smoke_out = next(s for s in steps if s["step"] == "bigray cluster smoke")["output"]
    smoke = json.loads(next(line for line in smoke_out.splitlines()[::-1] if line.startswith('{"cluster_smoke"')))[
        "cluster_smoke"
    ]
    # one ZeRO-3 step on gloo
    assert smoke["world_size"] == 2 and math.isfinite(smoke["zero3_loss"]) and smoke["zero3_loss"] > 0, smoke
    assert all(row["bus_gbps"] > 0 for row in smoke["links"]["all ranks"]), smoke
    pretrain = next(s for s in steps if s["step"] == "jobs/pretrain_gpt.py")["output"]
    summary = json.loads(next(line for line in pretrain.splitlines()[::-1] if line.startswith('{"run_dir"')))
    assert (
        summary["checkpoint"].startswith("s3://rehearsal/bigray-runs/gpt-124m/") and summary["metrics"]["step"] == 10
    ), summary
    requests = result["requests"]
    assert requests["no_key"] == 401, requests
    assert requests["completion"]["status"] == 200 and requests["completion"]["text"], requests
    top = requests["classify"]["body"]["predictions"]  # a Fashion-MNIST test image, by the Tune search's best trial
    assert requests["classify"]["status"] == 200 and len(top) == 3 and all(0 <= p["score"] <= 1 for p in top), requests


def test_a_local_data_directory_stops_the_rehearsal_at_the_pretraining_step(s3_server, downloads_dir, tmp_path):
    result = rehearse(tmp_path / "local", downloads_dir, "rehearsal-local", "data.cache_dir=./data")
    last = result["steps"][-1]
    assert last["step"] == "jobs/pretrain_gpt.py" and not last["ok"], result["steps"]
    assert "config error at 'data.cache_dir'" in last["output"] and "3 nodes are up" in last["output"], last["output"][
        -3000:
    ]
    assert "requests" not in result
