"""No shared filesystem: two simulated nodes with their own caches train from data that only the
bucket holds (ray.cluster_utils.Cluster in a subprocess, a real S3 API from conftest)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parent / "scripts" / "no_shared_fs.py"


def test_each_node_downloads_the_prepared_data_once_and_training_runs(s3_server, small_text, downloads_dir, tmp_path):
    text_cfg, _ = small_text
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), str(downloads_dir), str(text_cfg.max_chars), str(text_cfg.vocab_size)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [line for line in out.stdout.splitlines() if line.startswith('{"finished"')]
    assert lines, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(lines[-1])
    assert result["step"] == 10 and result["checkpoint"].startswith("s3://no-shared-fs/runs/gpt/"), result
    for node, fetched in result["downloads"].items():
        data = [d for d in fetched if d["location"] == result["data"]]
        assert len(data) == 1, (node, fetched)  # both workers' processes on a node share one download
        assert Path(data[0]["to"]).is_relative_to(tmp_path / node)  # into that node's own cache
