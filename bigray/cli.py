"""The ``bigray`` command line: parse a config, call the library, exit non-zero with a clear message.

Each training subcommand takes ``--config FILE`` and repeated ``--set dotted.key=value``; the same
arguments work for ``python jobs/<job>.py`` (what ``ray job submit`` runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from bigray.config import ConfigError, DataPrepareConfig, load_config

log = logging.getLogger("bigray")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt="%H:%M:%S")
    for noisy in ("filelock", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see jobs/configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one dotted config key, e.g. --set train.lr=3e-4 (repeatable)",
    )


# ----------------------------------------------------------------------------- commands


def cmd_data_prepare(args: argparse.Namespace) -> dict[str, Any]:
    from bigray.artifacts.runs import finish, save_resolved_config
    from bigray.artifacts.storage import run_dir
    from bigray.data.images import image_summary
    from bigray.data.text import prepare_text

    cfg = load_config(DataPrepareConfig, args.config, args.overrides)
    t0 = time.time()
    dataset, text_stats = prepare_text(cfg.text)
    text_stats["directory"] = dataset.location
    text_stats["seconds"] = round(time.time() - t0, 1)
    log.info("text: %s", text_stats)
    images: dict[str, Any] = {"skipped": True}
    if not cfg.skip_images:
        t1 = time.time()
        images = image_summary(cfg.images)
        images["seconds"] = round(time.time() - t1, 1)
        log.info("images: %s", images)
    directory = run_dir(cfg.run.storage_path, cfg.run.name)
    save_resolved_config(directory, cfg)
    return finish(directory, None, {}, text=text_stats, images=images, seconds=round(time.time() - t0, 1))


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    """`bigray pretrain-gpt`, `finetune-gpt` and `train-resnet`: the job kind's config, then its launch."""
    from bigray.recipes import JOBS
    from bigray.recipes.launch import launch

    kind = JOBS[args.kind]
    return launch(kind, load_config(kind.config_class, args.config, args.overrides + _resume_override(args)))


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from bigray.export import export_gpt

    info = export_gpt(args.checkpoint, args.out, adapter=args.adapter)
    print(json.dumps({"exported": args.out, **info}), flush=True)
    return info


def cmd_tune(args: argparse.Namespace) -> dict[str, Any]:
    from bigray.config import TuneJobConfig
    from bigray.tune import run_search

    if args.resume:
        return run_search(TuneJobConfig(), resume_dir=args.resume)
    return run_search(load_config(TuneJobConfig, args.config, args.overrides))


def cmd_serve(args: argparse.Namespace) -> None:
    from bigray.artifacts.locate import servable
    from bigray.config import load_config
    from bigray.serve.launch import deploy_from, serve_forever
    from bigray.serve.settings import ServeArgs

    settings = load_config(ServeArgs, args.config, args.overrides + _serve_overrides(args))
    if not settings.gpt_checkpoint and not settings.resnet_checkpoint:
        raise ConfigError("gpt_checkpoint", "give --gpt CKPT, --resnet CKPT or both")
    if reason := settings.key_missing_for_host():
        raise ConfigError("host", reason)
    # Refuse a broken checkpoint (local or in storage) here, with one clear error, before any replica tries it.
    for path, kind in ((settings.gpt_checkpoint, "gpt"), (settings.resnet_checkpoint, "resnet")):
        if path:
            servable(path, kind)
    if args.detach:
        print(json.dumps({"deployed": "bigray", "url": deploy_from(settings)}), flush=True)
    else:
        serve_forever(settings)


def _serve_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    for flag, key in (("gpt", "gpt_checkpoint"), ("resnet", "resnet_checkpoint"), ("port", "port"), ("host", "host")):
        if getattr(args, flag, None) is not None:
            out.append(f"{key}={getattr(args, flag)}")
    return out


def cmd_quickstart(args: argparse.Namespace) -> dict[str, Any]:
    from bigray.quickstart import run

    return run(args.storage_path, args.overrides)


def cmd_bench(args: argparse.Namespace) -> None:
    """Run benchmarks from the checkout's bench/ folder (each prints its ratio against a baseline)."""
    import subprocess
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "bench"
    available = sorted(p.stem for p in bench_dir.glob("*.py") if p.stem != "common")
    if not args.names:
        print("benchmarks: " + ", ".join(available) + "  (results go to bench/out/, summary in bench/README.md)")
        return
    for name in args.names:
        if name not in available:
            raise ConfigError("bench", f"unknown benchmark {name!r}; available: {', '.join(available)}")
        subprocess.run([sys.executable, str(bench_dir / f"{name}.py")], check=True)


def cmd_cluster_check(args: argparse.Namespace) -> dict[str, Any]:
    """`bigray cluster check`: print each finding, then a JSON summary; exit 1 if any failed."""
    import dataclasses

    import ray

    from bigray.cluster import ensure_ray
    from bigray.recipes.preflight import check

    cfg = job_config(args.config, args.overrides) if args.config else None
    started = ensure_ray()
    try:
        findings = check(cfg)
    finally:
        if started:
            ray.shutdown()
    for f in findings:
        print(f"{'ok  ' if f.ok else 'FAIL'}  {f.check}: {f.detail}", flush=True)
    failed = [f for f in findings if not f.ok]
    summary = {"cluster_check": "failed" if failed else "passed", "findings": [dataclasses.asdict(f) for f in findings]}
    print(json.dumps(summary), flush=True)
    if failed:
        print(f"bigray: cluster check failed: {len(failed)} of {len(findings)} checks (FAIL above)", file=sys.stderr)
        raise SystemExit(1)
    return summary


def job_config(path: str, overrides: list[str]) -> Any:
    """The typed config of a job YAML, whichever command runs it (Tune, GPT pretraining or
    fine-tuning, ResNet): the first config class that accepts every key."""
    import yaml

    from bigray.config import TuneJobConfig
    from bigray.recipes import JOBS

    raw = yaml.safe_load(Path(path).read_text()) if Path(path).is_file() else {}
    classes = [TuneJobConfig] if "tune" in (raw or {}) else [kind.config_class for kind in JOBS.values()]
    errors = []
    for cls in classes:
        try:
            return load_config(cls, path, overrides)
        except ConfigError as e:
            errors.append(f"{cls.__name__}: {e}")
    raise ConfigError("", f"{path} is no job config bigray knows ({'; '.join(errors)})")


def cmd_cluster_smoke(args: argparse.Namespace) -> dict[str, Any]:
    from bigray.smoke import run

    return run(args.config, args.overrides)


def _resume_override(args: argparse.Namespace) -> list[str]:
    return [f"resume_from={args.resume_from}"] if getattr(args, "resume_from", None) else []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bigray", description="Train and serve GPT (DeepSpeed ZeRO) and ResNet models on Ray."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser("data", help="prepare the offline datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prep = data_sub.add_parser("prepare", help="build the text corpus, tokenizer and token shards; check image data")
    add_config_args(prep)
    prep.set_defaults(func=cmd_data_prepare)

    for name, kind, help_text in (
        ("pretrain-gpt", "gpt", "pretrain a GPT with DeepSpeed ZeRO on Ray Train"),
        (
            "finetune-gpt",
            "gpt-finetune",
            "fine-tune a pretrained GPT (full or LoRA) on text, prompt/completion or chats",
        ),
        ("train-resnet", "resnet", "train a torchvision ResNet with DDP on Ray Train"),
    ):
        trainer = sub.add_parser(name, help=help_text)
        add_config_args(trainer)
        trainer.add_argument(
            "--resume-from", metavar="PATH", help="checkpoint, run dir or summary.json to continue from"
        )
        trainer.set_defaults(func=cmd_train, kind=kind)

    tune = sub.add_parser("tune", help="hyperparameter search with Ray Tune over either trainer")
    add_config_args(tune)
    tune.add_argument(
        "--resume", metavar="RUN_DIR", help="continue an interrupted search without redoing finished trials"
    )
    tune.set_defaults(func=cmd_tune)

    srv = sub.add_parser("serve", help="serve GPT and/or ResNet checkpoints over HTTP until interrupted")
    add_config_args(srv)
    srv.add_argument(
        "--gpt", metavar="CKPT", help="GPT checkpoint, run directory, summary.json or exported HF directory"
    )
    srv.add_argument("--resnet", metavar="CKPT", help="ResNet checkpoint, run directory or summary.json")
    srv.add_argument("--port", type=int, help="HTTP port (default 8000)")
    srv.add_argument("--host", help="HTTP host (default 127.0.0.1; 0.0.0.0 on a cluster's head)")
    srv.add_argument(
        "--detach",
        action="store_true",
        help="deploy onto the (cluster's) Serve and return instead of serving until Ctrl-C",
    )
    srv.set_defaults(func=cmd_serve)

    cluster = sub.add_parser("cluster", help="check the Ray cluster a job will run on")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    check = cluster_sub.add_parser(
        "check",
        help="before the expensive job: versions on every node, storage read and written "
        "from every node, the accelerator type and the workers' fit (run it as a Ray job)",
    )
    add_config_args(check)
    check.set_defaults(func=cmd_cluster_check)
    smoke = cluster_sub.add_parser(
        "smoke",
        help="all-reduce bandwidth per link (all ranks, within a node, across nodes) and one "
        "ZeRO-3 step, on a GPT job config's workers (run it as a Ray job after `ray up`)",
    )
    add_config_args(smoke)
    smoke.set_defaults(func=cmd_cluster_smoke)

    quick = sub.add_parser("quickstart", help="the main job end to end on an embedded local Ray (~8 min on 2 cores)")
    quick.add_argument("--storage-path", default="./runs", help="where run directories go (default ./runs)")
    quick.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a GPT config key"
    )
    quick.set_defaults(func=cmd_quickstart)

    bench = sub.add_parser("bench", help="run benchmarks from bench/ (no name: list them)")
    bench.add_argument("names", nargs="*", help="benchmark names, e.g. gpt_ray_overhead")
    bench.set_defaults(func=cmd_bench)

    export = sub.add_parser("export", help="consolidate a GPT checkpoint into a Hugging Face model directory")
    export.add_argument("checkpoint", help="checkpoint directory, run directory or summary.json")
    export.add_argument("out", help="new output directory")
    export.add_argument(
        "--adapter",
        action="store_true",
        help="a LoRA checkpoint: write its adapter (peft format) instead of the merged model",
    )
    export.set_defaults(func=cmd_export)

    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    from bigray.artifacts.checkpoint import CheckpointError
    from bigray.artifacts.storage import StorageError
    from bigray.cluster import WorkersUnavailable, read_secret_files
    from bigray.data.cache import DataError
    from bigray.recipes.launch import TrainingFailed
    from bigray.recipes.preflight import ClusterCheckFailed

    failures = (  # what a user can fix: one line, no traceback
        (ConfigError, "", 2),
        (DataError, "data error: ", 2),
        (CheckpointError, "checkpoint error: ", 2),
        (StorageError, "storage error: ", 2),
        (ClusterCheckFailed, "cluster check failed: ", 2),
        (TrainingFailed, "", 1),
        (WorkersUnavailable, "", 1),
    )
    try:
        read_secret_files()
        args.func(args)
    except tuple(e for e, _, _ in failures) as e:
        prefix, code = next((p, c) for kind, p, c in failures if isinstance(e, kind))
        print(f"bigray: {prefix}{e}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("bigray: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
