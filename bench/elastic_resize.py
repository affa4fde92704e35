"""What a resize costs: an elastic GPT run (``scaling.num_workers: [1, 2]``, ZeRO-3) on a 2-node Ray
cluster on this machine loses a node and gets one back, for the tiny preset and the 124m preset.

The scenario is tests/scripts/elastic.py's (``lost``: the node is removed without notice once a
checkpoint is registered; the run goes on 1 worker; once that worker has checkpointed, a node is
added and Ray's resize check, every 2 s here, brings the run back to 2). Ray Train's own worker-group
start timeout is left at its default (60 s). For each resize it prints the seconds from the event
(the node lost, the node added) to the next training step, and where the seconds from the checkpoint
the restart resumed from to that step (the stretch's ``lost_s``) went:

- thrown away: training after that checkpoint, until the event (replayed after the restart);
- detection and restart: from the event until the new worker process starts its own work (Ray
  noticing, the controller's decision, its try at the old world size, starting the actors);
- load and re-shard: the trainer's resume phase (``startup/resume_s``: reading the checkpoint, the
  Universal Checkpoint conversion at a new world size, the load);
- warm-up: the rest of the new workers' start-up (model build, DeepSpeed init, the first step).

Run: python bench/elastic_resize.py [tiny 124m]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

from common import REPO, save_result, scratch

SCRIPT = REPO / "tests" / "scripts" / "elastic.py"
PRESETS = {
    # preset: (data: max chars, vocab), checkpoint interval, steps, overrides
    "tiny": ((400_000, 512), 5, 60, []),
    "124m": (
        (2_000_000, 8192),
        3,
        15,
        ["model.preset=124m", "model.block_size=128", "train.micro_batch_size=1", "train.global_batch_size=2"],
    ),
}


def breakdown(rows: list[dict], segment: dict, event_at: float, resumed_saved_at: float | None) -> dict:
    """Where a stretch's ``lost_s`` went (see the module docstring)."""
    first = next(r for r in rows if r["step"] == segment["from_step"] + 1 and "startup/resume_s" in r)
    phases = {k: v for k, v in first.items() if k.startswith("startup/")}
    in_process = sum(phases.values())
    first_step_at = resumed_saved_at + segment["lost_s"] if resumed_saved_at else None
    return {
        "event_to_next_step_s": round(first_step_at - event_at, 1) if first_step_at else None,
        "lost_s": segment["lost_s"],
        "thrown_away_s": round(event_at - resumed_saved_at, 1) if resumed_saved_at else None,
        "detection_and_restart_s": round(first_step_at - in_process - event_at, 1) if first_step_at else None,
        "load_and_reshard_s": round(phases["startup/resume_s"], 1),
        "warm_up_s": round(in_process - phases["startup/resume_s"], 1),
        "phases": phases,
    }


def run(preset: str) -> dict:
    from bigray.config import TextDataConfig
    from bigray.data.text import prepare_text

    (max_chars, vocab), interval, steps, overrides = PRESETS[preset]
    tmp = scratch(f"elastic-{preset}")
    data = TextDataConfig(cache_dir=str(tmp / "data"), max_chars=max_chars, vocab_size=vocab)
    prepare_text(data)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp / "out"), str(tmp / "data" / "downloads"), data.cache_dir,
         str(max_chars), str(vocab), "3", "lost", f"--interval={interval}",
         f"--steps={steps}", "--start-timeout-s=60", "--timeout-s=1500", *[f"--set={o}" for o in overrides]],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"elastic"')]
    if not lines:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    run = json.loads(lines[-1])["elastic"]
    if not run["finished"]:
        raise RuntimeError(f"{preset}: {run['error'] or run.get('stuck_at')}")
    segments = run["summary"]["segments"]
    if [s["world_size"] for s in segments] != [2, 1, 2]:
        raise RuntimeError(f"{preset}: segments {segments}")
    return {
        "preset": preset,
        "step_time_s": {
            n: round(statistics.median(r["train/step_time_s"] for r in run["rows"] if r["train/world_size"] == n), 2)
            for n in (1, 2)
        },
        "shrink": breakdown(run["rows"], segments[1], run["lost_at"], run.get("shrink_resumed_saved_at")),
        "grow": breakdown(run["rows"], segments[2], run["added_at"], run.get("grow_resumed_saved_at")),
        "loss_to_next_step_s": run["loss_to_next_step_s"],
        "return_to_next_step_s": run["return_to_next_step_s"],
    }


def main(presets: list[str]) -> dict:
    result = {"benchmark": "elastic_resize", "zero_stage": 3, "rows": [run(p) for p in presets]}
    save_result("elastic_resize", result)
    for row in result["rows"]:
        for what in ("shrink", "grow"):
            b = row[what]
            print(
                f"{row['preset']:>5} {what:>6}: event -> next step {b['event_to_next_step_s']} s; lost_s {b['lost_s']} ="
                f" thrown away {b['thrown_away_s']} + detection and restart {b['detection_and_restart_s']}"
                f" + load and re-shard {b['load_and_reshard_s']} + warm-up {b['warm_up_s']}"
            )
    return result


if __name__ == "__main__":
    main(sys.argv[1:] or ["tiny", "124m"])
