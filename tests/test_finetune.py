"""GPT fine-tuning: from a bigray checkpoint or an exported Hugging Face directory, on text or SFT JSONL."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bigray.artifacts.checkpoint import CheckpointError
from bigray.config import ConfigError, GPTFinetuneConfig, from_dict, load_config, to_dict
from bigray.data.cache import DataError
from bigray.data.documents import load_tokenizer
from bigray.data.finetune import prepare_finetune_data
from bigray.data.text import TokenWindows

REPO = Path(__file__).resolve().parents[1]

# A corpus distinct from the Shakespeare the base model saw: real Python source from the stdlib.
STDLIB_SOURCES = [
    "json/decoder.py",
    "json/encoder.py",
    "json/scanner.py",
    "csv.py",
    "shlex.py",
    "textwrap.py",
    "fnmatch.py",
]


@pytest.fixture(scope="module")
def code_files():
    import csv

    lib = Path(csv.__file__).parent
    return [str(lib / f) for f in STDLIB_SOURCES]


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    """Prompt/completion pairs the base model cannot know: two-digit additions written out."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("sft") / "add.jsonl"
    with open(path, "w") as f:
        for _ in range(300):
            a, b = (int(v) for v in rng.integers(10, 50, size=2))
            f.write(json.dumps({"prompt": f"Q: {a} plus {b}?\nA:", "completion": f" {a + b}\n"}) + "\n")
    return path


@pytest.fixture(scope="module")
def exported_dir(gpt_checkpoint, tmp_path_factory):
    from bigray.export import export_gpt

    out = tmp_path_factory.mktemp("export") / "hf"
    export_gpt(str(gpt_checkpoint[-1]), str(out))
    return out


def ft_config(tmp_path, init_from, files, fmt="text", *overrides):
    return load_config(
        GPTFinetuneConfig,
        REPO / "jobs" / "configs" / "gpt_finetune.yaml",
        [
            f"init_from={init_from}",
            f"data.format={fmt}",
            f"data.train_files={json.dumps([str(f) for f in files])}",
            f"data.cache_dir={tmp_path}/data",
            "model.block_size=64",
            "train.micro_batch_size=8",
            "train.eval_batches=4",
            f"run.storage_path={tmp_path}/runs",
            *overrides,
        ],
    )


def test_sft_labels_mask_prompt_tokens(sft_file, gpt_checkpoint, tmp_path):
    tok_dir = gpt_checkpoint[-1] / "model"
    cfg = ft_config(tmp_path, gpt_checkpoint[-1], [sft_file], "jsonl").data
    data = prepare_finetune_data(cfg, tok_dir)
    tok = load_tokenizer(tok_dir)
    tokens, mask = np.asarray(data.tokens("train")), np.asarray(data.loss_mask("train"))
    rows = [json.loads(line) for line in sft_file.read_text().splitlines()][: data.manifest["examples"]["train"]]
    # The mask is 1 exactly on the completions (and the end-of-text closing each), 0 on the prompts.
    assert tok.decode(tokens[mask == 1].tolist()) == "".join(r["completion"] + tok.eos_token for r in rows)
    assert tok.decode(tokens[mask == 0].tolist()) == "".join(r["prompt"] for r in rows)
    # In batches, a target is kept exactly where it is a completion token.
    windows = TokenWindows(data.tokens("train"), 64, data.loss_mask("train"))
    x, y = windows.batch(np.arange(windows.num_windows))
    w = 65
    targets = np.stack([tokens[i * w + 1 : (i + 1) * w] for i in range(windows.num_windows)])
    target_mask = np.stack([mask[i * w + 1 : (i + 1) * w] for i in range(windows.num_windows)])
    assert np.array_equal(y == -100, target_mask == 0)
    assert np.array_equal(y[y != -100], targets[target_mask == 1])
    assert 0 < (y != -100).mean() < 0.5  # completions are the short part


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "a", "completion": "b"}\nnot json\n', "add.jsonl line 2: not valid JSON"),
        ('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a"}\n', "add.jsonl line 3: missing field 'completion'"),
        ('{"prompt": 3, "completion": "b"}\n', "add.jsonl line 1: 'prompt' must be a string, got int"),
        ('["prompt", "completion"]\n', "add.jsonl line 1: expected a JSON object"),
        ("\n\n", "the fine-tuning dataset is empty"),
    ],
)
def test_bad_jsonl_is_named_with_its_line(tmp_path, gpt_checkpoint, content, message):
    path = tmp_path / "add.jsonl"
    path.write_text(content)
    cfg = ft_config(tmp_path, gpt_checkpoint[-1], [path], "jsonl").data
    with pytest.raises(DataError, match=message):
        prepare_finetune_data(cfg, gpt_checkpoint[-1] / "model")


def test_hostile_chat_rows_are_refused_naming_the_line_with_bounded_memory(tmp_path):
    """A row of 20,000 turns (quadratic to render) and a 40-million-character line (read no further
    than the cap) are refused with file and line; the driver's memory stays near the cap."""
    import tracemalloc

    from bigray.data.finetune import MAX_LINE_CHARS, read_chat_jsonl

    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(20_000)]
    many = tmp_path / "many.jsonl"
    many.write_text(json.dumps({"messages": turns[:2]}) + "\n" + json.dumps({"messages": turns}) + "\n")
    with pytest.raises(DataError, match="many.jsonl line 2: 20000 messages; a conversation holds at most 256"):
        read_chat_jsonl(many)
    long = tmp_path / "long.jsonl"
    with open(long, "w") as f:  # written in pieces: this test holds no such string either
        f.write('{"messages": [{"role": "user", "content": "')
        for _ in range(40):
            f.write("x" * 1_000_000)
        f.write('"}]}\n')
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=f"long.jsonl line 1: longer than {MAX_LINE_CHARS:,} characters"):
            read_chat_jsonl(long)
        peak_mib = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert peak_mib < 16, peak_mib  # about the cap (4 Mi characters), not the 40 MB line


def test_bad_base_models_are_refused(tmp_path, exported_dir, downloads_dir):
    import shutil

    from bigray.config import TextDataConfig
    from bigray.data.text import prepare_text
    from bigray.recipes.gpt import open_pretrained

    # (other architectures: tests/test_families.py) A GPT-2 model of 512 tokens next to GPT-2's real 50,257-token tokenizer: refused by name.
    mismatched = tmp_path / "mismatched"
    shutil.copytree(exported_dir, mismatched)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (mismatched / f).unlink(missing_ok=True)
    (tmp_path / "gpt2data" / "downloads").parent.mkdir()
    (tmp_path / "gpt2data" / "downloads").symlink_to(downloads_dir)
    gpt2, _ = prepare_text(TextDataConfig(cache_dir=str(tmp_path / "gpt2data"), max_chars=20_000, tokenizer="gpt2"))
    load_tokenizer(gpt2.tokenizer_dir).save_pretrained(str(mismatched))
    with pytest.raises(CheckpointError, match="tokenizer has 50257 tokens but the model's vocabulary .* has 512"):
        open_pretrained(mismatched)
    with pytest.raises(CheckpointError, match="holds no complete bigray checkpoint"):
        open_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="init_from"):
        from_dict(GPTFinetuneConfig, {"data": {"train_files": ["x"]}})


def test_hf_export_and_bigray_checkpoint_start_from_the_same_loss(tmp_path, gpt_checkpoint, exported_dir, code_files):
    from bigray.recipes.gpt import prepare_finetune
    from bigray.train.context import LocalContext
    from bigray.train.gpt import GPTTrainer

    losses = {}
    for name, init in (("checkpoint", gpt_checkpoint[-1]), ("exported", exported_dir)):
        job = prepare_finetune(ft_config(tmp_path, init, code_files, "text", "scaling.num_workers=1"))
        trainer = GPTTrainer(job.config, LocalContext(str(tmp_path / name)), job.data_dir)
        losses[name] = trainer.evaluate()["val/loss"]
    assert losses["checkpoint"] == pytest.approx(losses["exported"], abs=1e-5)
    assert 3.0 < losses["checkpoint"] < 12.0


def test_sft_learns_the_completions_locally(tmp_path, gpt_checkpoint, sft_file):
    from bigray.recipes.gpt import train_local

    cfg = ft_config(
        tmp_path,
        gpt_checkpoint[-1],
        [sft_file],
        "jsonl",
        "train.max_steps=40",
        "train.lr=1e-3",
        "train.eval_interval=40",
        "run.checkpoint_interval=40",
        "scaling.num_workers=1",
        "scaling.cpus_per_worker=2",
    )
    metrics, ctx = train_local(cfg, str(tmp_path / "sft"))
    assert metrics["step"] == 40
    assert metrics["val/loss"] < 0.6 * metrics["init/val_loss"], metrics


@pytest.mark.slow
def test_finetune_on_ray_lowers_val_loss_resumes_and_exports(ray_cluster, tmp_path, gpt_checkpoint, code_files):
    from transformers import AutoModelForCausalLM

    from bigray.export import export_gpt
    from bigray.recipes.gpt import finetune

    overrides = [
        "train.lr=1e-3",
        "train.eval_interval=10",
        "train.log_interval=5",
        "run.checkpoint_interval=10",
        "run.name=code",
    ]
    cfg = ft_config(tmp_path, gpt_checkpoint[-1], code_files, "text", "train.max_steps=20", *overrides)
    summary = finetune(cfg)
    m = summary["metrics"]
    assert m["step"] == 20
    assert m["val/loss"] < m["init/val_loss"] - 0.5, m
    # Same run name, more steps: continues from the step-20 checkpoint instead of starting over.
    summary = finetune(ft_config(tmp_path, gpt_checkpoint[-1], code_files, "text", "train.max_steps=30", *overrides))
    rows = [json.loads(line) for line in Path(summary["run_dir"], "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps) and steps[-1] == 30 and steps.count(10) == 1
    assert summary["metrics"]["init/val_loss"] == m["init/val_loss"]
    out = tmp_path / "exported"
    export_gpt(summary["checkpoint"], str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.n_layer == 2
    assert to_dict(cfg)["init_from"]  # the resolved config kept the base model's path
    saved = json.loads((Path(summary["checkpoint"]) / "bigray.json").read_text())
    assert Path(saved["config"]["init_from"]).is_absolute()


def test_cli_refuses_bad_data_before_training(tmp_path, gpt_checkpoint):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b",\n')
    out = subprocess.run(
        [
            sys.executable,
            "jobs/finetune_gpt.py",
            "--config",
            "jobs/configs/gpt_finetune.yaml",
            "--set",
            f"init_from={gpt_checkpoint[-1]}",
            "--set",
            f"data.train_files=[{bad}]",
            "--set",
            f"data.cache_dir={tmp_path}",
            "--set",
            f"run.storage_path={tmp_path}/runs",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "bad.jsonl line 2: not valid JSON" in out.stderr
    assert "Started a local Ray instance" not in out.stderr
