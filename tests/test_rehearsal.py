"""README's "Running on a cluster", rehearsed on this machine (tests/scripts/rehearsal.py): its
commands in order, as written, on a 3-node Ray cluster started with `ray start` (token auth on)
whose nodes share no data, cache or run directory, with the S3 API server on loopback as the only
shared storage: the cluster check, the bandwidth and ZeRO-3 smoke, pretraining (data prepared
into the bucket), the images
uploaded, a Tune search, the Serve job, then requests to the endpoint with and without the key.
The pretraining job submitted with a local data directory (as an operator might) is refused, naming it."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parent / "scripts" / "rehearsal.py"


@pytest.fixture(scope="module")
def rehearsal(s3_server, downloads_dir, tmp_path_factory) -> dict:
    import boto3

    boto3.client("s3").create_bucket(Bucket="rehearsal")
    out = tmp_path_factory.mktemp("rehearsal")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(downloads_dir), "rehearsal"],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"steps"')]
    assert lines, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(lines[-1])


def test_readme_cluster_commands_pass_in_order_on_nodes_that_share_only_a_bucket(rehearsal):
    steps = rehearsal["steps"]
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
    requests = rehearsal["requests"]
    assert requests["no_key"] == 401, requests
    assert requests["completion"]["status"] == 200 and requests["completion"]["text"], requests
    top = requests["classify"]["body"]["predictions"]  # a Fashion-MNIST test image, by the Tune search's best trial
    assert requests["classify"]["status"] == 200 and len(top) == 3 and all(0 <= p["score"] <= 1 for p in top), requests


def test_a_local_data_directory_is_refused_at_the_pretraining_step(rehearsal):
    local = rehearsal["local_data"]
    assert not local["ok"], local
    assert "config error at 'data.cache_dir'" in local["output"] and "3 nodes are up" in local["output"], local[
        "output"
    ][-3000:]
