"""`bigray quickstart`: the main job end to end on an embedded local Ray.

Prepare data, pretrain a small GPT with ZeRO-2 on 2 workers, export it and generate a sample,
train a ResNet on Fashion-MNIST, search the GPT's learning rate with Ray Tune (ASHA), serve both
models on Ray Serve and query them over HTTP, and print what a user wants to see. Every step is
the same library call the individual commands make; only the presets are smaller.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from bigray.config import GPTPretrainConfig, ResNetJobConfig, load_config

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def _preset(name: str) -> Path:
    """Presets ship in the repo's jobs/configs (a source checkout); fall back to the working directory."""
    p = CONFIGS / name
    return p if p.is_file() else Path("jobs/configs") / name


def generate_sample(model_dir: str | Path, prompt: str, max_new_tokens: int = 60, seed: int = 0) -> str:
    """Sample a continuation from a Hugging Face model directory (as written by export)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=True, top_k=40, temperature=0.8, pad_token_id=tok.eos_token_id
        )
    return tok.decode(out[0])


def run(storage_path: str = "./runs", overrides: list[str] | None = None) -> dict[str, Any]:
    import ray

    from bigray.artifacts.runs import finish
    from bigray.artifacts.storage import run_dir
    from bigray.artifacts.tracking import record_outcome
    from bigray.cluster import ensure_ray
    from bigray.data.images import image_summary
    from bigray.data.text import open_prepared
    from bigray.export import export_gpt
    from bigray.recipes.gpt import PRETRAIN
    from bigray.recipes.launch import launch_prepared, prepare
    from bigray.recipes.resnet import RESNET

    t_start = time.time()
    root = run_dir(storage_path, "quickstart")
    stage_times: dict[str, float] = {}
    started = ensure_ray()
    try:
        t0 = time.time()
        gpt_cfg = load_config(
            GPTPretrainConfig, _preset("gpt_tiny.yaml"), [f"run.storage_path={root}", *(overrides or [])]
        )
        gpt_job = prepare(PRETRAIN, gpt_cfg)
        stats = open_prepared(gpt_job.data_dir).manifest
        log.info(
            "[1/5] data: %d train / %d val tokens, vocab %d",
            stats["tokens"]["train"],
            stats["tokens"]["val"],
            stats["vocab_size"],
        )
        resnet_cfg = load_config(
            ResNetJobConfig,
            _preset("resnet_fashion.yaml"),
            [
                "train.epochs=1",
                "data.max_train_samples=12000",
                "data.max_eval_samples=2000",
                "train.precision=bf16",
                "train.batch_size=32",
                "train.lr=0.1",
                f"run.storage_path={root}",
                "run.name=resnet",
            ],
        )
        resnet_job = prepare(RESNET, resnet_cfg)
        images = image_summary(resnet_job.config.data)
        stage_times["data"] = time.time() - t0

        t0 = time.time()
        log.info(
            "[2/5] pretraining GPT (%s, ZeRO-%d, %d workers)",
            gpt_cfg.model.preset,
            gpt_cfg.deepspeed.zero_stage,
            gpt_cfg.scaling.num_workers,
        )
        gpt_summary = launch_prepared(PRETRAIN, gpt_job)
        hf_dir = Path(root) / "gpt-hf"
        if hf_dir.exists():
            import shutil

            shutil.rmtree(hf_dir)
        export_gpt(gpt_summary["checkpoint"], str(hf_dir))
        sample = generate_sample(hf_dir, "ROMEO:\n")
        stage_times["gpt"] = time.time() - t0

        t0 = time.time()
        log.info(
            "[3/5] training %s on Fashion-MNIST (%d images, %d workers)",
            resnet_cfg.model.arch,
            resnet_cfg.data.max_train_samples,
            resnet_cfg.scaling.num_workers,
        )
        resnet_summary = launch_prepared(RESNET, resnet_job)
        example = classify_example(resnet_summary["checkpoint"], resnet_job.config)
        stage_times["resnet"] = time.time() - t0

        t0 = time.time()
        log.info("[4/5] searching the GPT learning rate with Ray Tune (ASHA, 4 trials)")
        tune_summary = short_search(root, gpt_cfg)
        stage_times["tune"] = time.time() - t0

        t0 = time.time()
        log.info("[5/5] serving both models on Ray Serve and querying them over HTTP")
        served = serve_and_query(str(hf_dir), resnet_summary["checkpoint"], resnet_job.config)
        stage_times["serve"] = time.time() - t0
        plots = write_plots(root, gpt_summary["run_dir"], resnet_summary["run_dir"])
    finally:
        if started:
            ray.shutdown()

    report = {
        "gpt": {
            "val_loss": gpt_summary["metrics"].get("val/loss"),
            "val_perplexity": gpt_summary["metrics"].get("val/perplexity"),
            "checkpoint": gpt_summary["checkpoint"],
            "hf_export": str(hf_dir),
            "sample": sample,
        },
        "resnet": {
            "test_accuracy": resnet_summary["metrics"].get("val/acc"),
            "checkpoint": resnet_summary["checkpoint"],
            "example": example,
        },
        "tune": {
            "best_trial": tune_summary["best_trial"],
            "best_lr": tune_summary["best_config"]["train"]["lr"],
            "best_val_loss": tune_summary["metrics"].get("val/loss"),
            "trials": tune_summary["trials"],
            "run_dir": tune_summary["run_dir"],
        },
        "serve": served,
        "plots": plots,
        "data": {"text_tokens": stats["tokens"], "images": images},
        "stage_seconds": {k: round(v, 1) for k, v in stage_times.items()},
    }
    print_report(report)

    def record(summary: dict[str, Any]) -> None:  # the plots and this summary join the runs they came from
        record_outcome(
            gpt_job.config.tracking,
            gpt_summary["run_dir"],
            None,
            files=plots[:1],
            texts={"quickstart_summary.json": json.dumps(summary, indent=2)},
        )
        record_outcome(resnet_job.config.tracking, resnet_summary["run_dir"], None, files=plots[1:])

    metrics = {"gpt/val_loss": report["gpt"]["val_loss"], "resnet/val_acc": report["resnet"]["test_accuracy"]}
    return finish(
        root, gpt_summary["checkpoint"], metrics, record, seconds=round(time.time() - t_start, 1), report=report
    )


def classify_example(checkpoint: str, cfg: ResNetJobConfig) -> dict[str, Any]:
    """Classify the first test image with the saved checkpoint, as a server would."""
    import torch

    from bigray.artifacts.resnet_card import load_classifier
    from bigray.data.images import load_images
    from bigray.models.resnet import normalize

    model, card = load_classifier(checkpoint)
    splits, info = load_images(cfg.data)
    image, label = splits["test"][0]
    with torch.no_grad():
        probs = model(normalize(image[None], card["data"]["mean"], card["data"]["std"])).softmax(-1)[0]
    top = int(probs.argmax())
    return {
        "true_label": info.class_names[label],
        "predicted": info.class_names[top],
        "score": round(float(probs[top]), 3),
    }


def print_report(report: dict[str, Any]) -> None:
    g, r = report["gpt"], report["resnet"]
    lines = [
        "",
        "=" * 72,
        "bigray quickstart",
        f"GPT      val loss {g['val_loss']:.3f}  perplexity {g['val_perplexity']:.1f}",
        f"         checkpoint {g['checkpoint']}",
        f"         Hugging Face export {g['hf_export']}",
        "         sample:",
        *("           " + line for line in g["sample"].splitlines()[:12]),
        f"ResNet   test accuracy {100 * r['test_accuracy']:.2f}%",
        f"         checkpoint {r['checkpoint']}",
        f"         example: a {r['example']['true_label']!r} classified as {r['example']['predicted']!r} ({r['example']['score']:.2f})",
        f"Tune     best lr {report['tune']['best_lr']:.2e} (val loss {report['tune']['best_val_loss']:.3f}), trials {report['tune']['trials']}",
        f"Serve    POST /v1/completions -> {report['serve']['completion']!r}",
        f"         POST /v1/classify    -> {report['serve']['classification']}",
        f"plots    {', '.join(report['plots'])}",
        f"time per stage (s): {report['stage_seconds']}",
        "=" * 72,
    ]
    print("\n".join(lines), flush=True)


def short_search(root: str, gpt_cfg: GPTPretrainConfig) -> dict[str, Any]:
    """A 4-trial ASHA search over the tiny GPT's learning rate (one worker per trial)."""
    from bigray.config import TuneJobConfig, to_dict
    from bigray.tune import run_search

    trainer = to_dict(gpt_cfg)
    trainer["model"]["block_size"] = 64
    trainer["train"].update(max_steps=60, micro_batch_size=8, eval_interval=15, eval_batches=4, warmup_steps=10)
    trainer["scaling"]["num_workers"] = 1
    trainer["run"].update(checkpoint_interval=15)
    job = TuneJobConfig(
        tune=dataclasses.replace(
            TuneJobConfig().tune,
            trainer="gpt",
            num_samples=4,
            metric="val/loss",
            mode="min",
            space={"train.lr": {"loguniform": [1e-4, 1e-2]}},
            seed=0,
        ),
        trainer=trainer,
        run=dataclasses.replace(TuneJobConfig().run, storage_path=root, name="tune"),
    )
    import shutil

    shutil.rmtree(Path(root) / "tune", ignore_errors=True)
    return run_search(job)


def serve_and_query(gpt_dir: str, resnet_checkpoint: str, resnet_cfg: ResNetJobConfig) -> dict[str, Any]:
    """Deploy both models, send one completion and one classification over HTTP, then tear down."""
    import io

    import requests
    from PIL import Image
    from ray import serve

    from bigray.data.images import load_images
    from bigray.serve.launch import deploy
    from bigray.serve.settings import AppArgs

    url = deploy(AppArgs(gpt_checkpoint=gpt_dir, resnet_checkpoint=resnet_checkpoint), port=8000)
    try:
        completion = requests.post(
            f"{url}/v1/completions",
            json={"prompt": "JULIET:\n", "max_tokens": 24, "temperature": 0.8, "seed": 0},
            timeout=60,
        ).json()
        splits, info = load_images(resnet_cfg.data)
        image, label = splits["test"][1]
        buf = io.BytesIO()
        Image.fromarray(image[0].numpy()).save(buf, format="PNG")
        classified = requests.post(
            f"{url}/v1/classify?top_k=1", data=buf.getvalue(), headers={"content-type": "image/png"}, timeout=60
        ).json()
    finally:
        serve.shutdown()
    top = classified["predictions"][0]
    return {
        "url": url,
        "completion": completion["choices"][0]["text"],
        "classification": f"true {info.class_names[label]!r} -> {top['label']!r} ({top['score']:.2f})",
    }


def write_plots(root: str, gpt_run: str, resnet_run: str) -> list[str]:
    """PNG loss and accuracy curves from the runs' metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bigray.artifacts.runs import read_metrics

    out = []
    g = read_metrics(gpt_run)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in g], [r["train/loss"] for r in g], label="train")
    val = [r for r in g if "val/loss" in r]
    ax.plot([r["step"] for r in val], [r["val/loss"] for r in val], "o-", label="val")
    ax.set(xlabel="step", ylabel="loss", title="GPT pretraining (ZeRO-2, 2 workers)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(root) / "gpt_loss.png", dpi=100)
    out.append(str(Path(root) / "gpt_loss.png"))
    r = read_metrics(resnet_run)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([x["epoch"] for x in r], [x["val/acc"] for x in r], "o-")
    ax.set(xlabel="epoch", ylabel="test accuracy", title="ResNet-18 on Fashion-MNIST")
    fig.tight_layout()
    fig.savefig(Path(root) / "resnet_accuracy.png", dpi=100)
    out.append(str(Path(root) / "resnet_accuracy.png"))
    plt.close("all")
    return out
