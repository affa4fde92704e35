"""A simulated two-node cluster loses its training node (ray.cluster_utils, in a subprocess)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parent / "scripts" / "node_loss.py"


def _run(small_text, tmp_path, mode):
    text_cfg, _ = small_text
    out = subprocess.run(
        [sys.executable, str(SCRIPT), text_cfg.cache_dir, str(text_cfg.max_chars), str(text_cfg.vocab_size), str(tmp_path), mode],
        capture_output=True, text=True, timeout=480,
    )  # fmt: skip
    lines = [line for line in out.stdout.splitlines() if line.startswith('{"finished"')]
    assert lines, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(lines[-1])


def test_training_continues_from_checkpoint_once_capacity_is_back(small_text, tmp_path):
    result = _run(small_text, tmp_path, "recover")
    assert result["finished"] and result["final_step"] == 30, result
    steps = result["steps"]
    assert steps.count(11) == 2 and steps[-1] == 30  # resumed from the step-10 checkpoint on the new node
