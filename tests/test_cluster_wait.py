"""Jobs that do not fit the cluster yet: wait for the autoscaler's nodes (with progress and a
timeout), refuse at once what can never fit, size Tune's concurrency from what the cluster can
scale to. A real multi-node Ray cluster on this machine (tests/scripts/autoscaler_wait.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parent / "scripts" / "autoscaler_wait.py"


def test_a_job_waits_for_nodes_and_fails_clearly_when_none_can_come(small_text, tmp_path):
    text_cfg, _ = small_text
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), text_cfg.cache_dir, str(text_cfg.max_chars), str(text_cfg.vocab_size)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    lines = [line for line in out.stdout.splitlines() if line.startswith('{"cases"')]
    assert lines, out.stdout[-3000:] + out.stderr[-3000:]
    cases = json.loads(lines[-1])["cases"]
    fixed = cases["fixed_cluster"]
    assert not fixed["ok"] and "has no autoscaler" in fixed["error"] and "BIGRAY_WAIT_FOR_AUTOSCALER" in fixed["error"], fixed
    never = cases["never_fits"]
    assert not never["ok"] and "can never hold 2 workers of {CPU: 4}" in never["error"] and never["seconds"] < 5, never
    # Tune sizes its concurrency from the node types: three 1-CPU trials (the head and the 2-CPU node
    # to come), one 2-CPU trial, while the cluster holds one CPU now
    assert cases["trials"] == {"now_1cpu": 1, "at_most_1cpu": 3, "at_most_2cpu": 1}, cases["trials"]
    timeout = cases["timeout"]
    assert not timeout["ok"] and "resource_wait_s" in timeout["error"] and "holds 1 of 3 workers" in timeout["error"], timeout
    assert 4 <= timeout["seconds"] < 15, timeout
    grown = cases["grown"]
    assert grown["ok"] and grown["step"] == 2, grown  # the job started once the node came, and trained
    assert grown["seconds"] > grown["node_added_after"] >= 8
    log = cases["log"]
    assert any(m.startswith("waiting up to 300 s for the cluster to hold 2 workers of {CPU: 1} (1 fit now)") for m in log), log
    assert any(m.startswith("the cluster holds 2 workers of {CPU: 1} after") for m in log), log
