"""A real multi-node Ray cluster on this machine (tests/scripts/multi_node.py, in its own process:
one cluster for every check that needs nodes to come and go):

- jobs that do not fit yet wait for the autoscaler's nodes (with progress and a timeout), what can
  never fit is refused at once, and Tune sizes its concurrency from what the cluster can scale to;
- data and runs on the driver's own disk are refused before anything is prepared once the job's
  workers can run on other nodes;
- with no shared filesystem, each node downloads the data the driver prepared into the bucket once;
- a ZeRO-1 run that loses its node, right after its newest checkpoint was cut short, continues from
  the complete checkpoint before it once capacity is back, and trains."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parent / "scripts" / "multi_node.py"


@pytest.fixture(scope="module")
def phases(s3_server, small_text, downloads_dir, tmp_path_factory):
    text_cfg, _ = small_text
    out = tmp_path_factory.mktemp("multi-node")
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            str(out),
            str(downloads_dir),
            text_cfg.cache_dir,
            str(text_cfg.max_chars),
            str(text_cfg.vocab_size),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"phases"')]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads(lines[-1])["phases"]


def test_a_job_waits_for_nodes_and_fails_clearly_when_none_can_come(phases):
    _, result = phases
    cases = result["autoscaler"]
    fixed = cases["fixed_cluster"]
    assert (
        not fixed["ok"] and "has no autoscaler" in fixed["error"] and "BIGRAY_WAIT_FOR_AUTOSCALER" in fixed["error"]
    ), fixed
    assert cases["local_paths_one_node"]["ok"], cases  # one node: a local path is shared by all
    refused = cases["local_paths_refused"]  # nodes can come: refused before the data is prepared
    assert not refused["ok"] and refused["error"].startswith("ConfigError: config error at 'run.storage_path'"), refused
    assert "its autoscaler can add nodes" in refused["error"] and "data.cache_dir=" in refused["error"], refused
    assert (
        "s3://" in refused["error"] and "BIGRAY_SHARED_FILESYSTEM=1" in refused["error"] and refused["seconds"] < 5
    ), refused
    assert cases["local_paths_shared"]["ok"], cases
    never = cases["never_fits"]
    assert not never["ok"] and "can never hold 2 workers of {CPU: 4}" in never["error"] and never["seconds"] < 5, never
    # Tune sizes its concurrency from the node types: four 1-CPU trials, two 2-CPU trials (two
    # 2-CPU nodes to come), while the cluster holds no CPU now
    assert cases["trials"] == {"now_cpus": 0, "at_most_1cpu": 4, "at_most_2cpu": 2}, cases["trials"]
    timeout = cases["timeout"]
    assert not timeout["ok"] and "resource_wait_s" in timeout["error"] and "holds 0 of 3 workers" in timeout["error"], (
        timeout
    )
    assert 4 <= timeout["seconds"] < 15, timeout
    grown = result["grown"]
    assert grown["ok"] and grown["step"] == 10, grown  # the job started once the nodes came, and trained
    assert grown["seconds"] > grown["node_added_after"] >= 8
    log = result["log"]
    assert any(
        m.startswith("waiting up to 300 s for the cluster to hold 4 workers of {CPU: 1} (0 fit now)") for m in log
    ), log
    assert any(m.startswith("the cluster holds 4 workers of {CPU: 1} after") for m in log), log


def test_each_node_downloads_the_prepared_data_once_and_training_runs(phases):
    out, result = phases
    grown = result["grown"]
    assert grown["checkpoint"].startswith("s3://no-shared-fs/runs/grown/"), grown
    for node, fetched in grown["downloads"].items():
        data = [d for d in fetched if d["location"] == grown["data"]]
        assert len(data) == 1, (node, fetched)  # both workers' processes on a node share one download
        assert Path(data[0]["to"]).is_relative_to(out / node)  # into that node's own cache


def test_a_lost_node_costs_a_restart_from_the_last_complete_checkpoint(phases, small_text):
    """Ray restores the checkpoint it registered last, which was cut short: the run continues from
    the one before it, on the node that replaced the lost one. The run is ZeRO-1's training test too
    (ZeRO-2: tests/test_gpt.py; ZeRO-3: the same file and tests/test_families.py)."""
    _, result = phases
    lost = result["node_loss"]
    assert lost["finished"] and lost["final_step"] == 40, lost
    # what Ray restores first
    assert "checkpoint_step_0000020" in lost["truncated"] and lost["workers_on_one_node"], lost
    steps = lost["steps"]
    assert steps.count(11) == 2, steps  # replayed from the step-10 checkpoint, the complete one before the cut one
    assert steps[-1] == 40 and sorted(set(steps)) == list(range(1, 41))
    by_step = {int(k): v for k, v in lost["by_step"].items()}
    val = [by_step[s]["val/loss"] for s in (10, 20, 30, 40)]
    # well below a uniform guess
    assert val[0] > val[1] > val[2] > val[3] and val[3] < math.log(small_text[1].vocab_size) - 1.0, val
    assert by_step[40]["train/loss"] < by_step[1]["train/loss"] - 1.0 and 0 < by_step[40]["train/mfu"] < 1
    assert lost["shards"] == [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]  # ZeRO-1: the optimizer state split over both ranks
