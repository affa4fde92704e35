"""Elastic training (scaling.num_workers a range) on a real multi-node Ray cluster on this machine
(tests/scripts/elastic.py, in its own process): a GPT run on [1, 2] workers loses a node, continues
on the worker that remains, gets a node back and grows to 2 again, and trains on exactly the windows
an uninterrupted 2-worker run trains on. Config refusals: tests/test_config.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parent / "scripts" / "elastic.py"


@pytest.mark.parametrize("stage", [2, 3])
def test_a_run_on_a_worker_range_shrinks_when_a_node_goes_and_grows_when_one_comes(
    small_text, downloads_dir, tmp_path, stage
):
    text_cfg, _ = small_text
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            str(tmp_path),
            str(downloads_dir),
            text_cfg.cache_dir,
            str(text_cfg.max_chars),
            str(text_cfg.vocab_size),
            str(stage),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"elastic"')]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = json.loads(lines[-1])["elastic"]
    assert run["finished"] and run["summary"]["metrics"]["step"] == 300, {k: run[k] for k in ("error", "stuck_at")}
    # 2 workers, then the one that remained (from the newest checkpoint Ray had registered), then 2 again
    segments = run["summary"]["segments"]
    assert [s["world_size"] for s in segments] == [2, 1, 2], segments
    assert segments[0]["from_step"] == 0 and segments[-1]["to_step"] == 300
    assert all(a["to_step"] == b["from_step"] for a, b in zip(segments, segments[1:])), segments
    assert segments[1]["to_step"] - segments[1]["from_step"] >= 5, segments  # trained on one worker
    # every step trained on the windows of the uninterrupted 2-worker run, to fp32 summation order
    rows, reference = {}, {r["step"]: r for r in run["reference_rows"]}
    for r in run["rows"]:  # a replayed step's later row is the one the run kept
        rows[r["step"]] = r
    assert sorted(rows) == sorted(reference) == list(range(1, 301))
    for step, r in rows.items():
        assert r["train/windows"] == reference[step]["train/windows"], step
        assert r["train/loss"] == pytest.approx(reference[step]["train/loss"], rel=1e-5), step
    assert {r["train/world_size"] for r in run["rows"]} == {1, 2}
    print({k: run[k] for k in ("lost_after_step", "loss_to_next_step_s", "return_to_next_step_s")})
