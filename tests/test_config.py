from pathlib import Path

import pytest
import yaml

from bigray.config import (
    ConfigError,
    DataPrepareConfig,
    GPTFinetuneConfig,
    GPTPretrainConfig,
    ResNetJobConfig,
    TuneJobConfig,
    load_config,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs" / "configs"
JOB_CLASSES = {
    "gpt_finetune": GPTFinetuneConfig,
    "gpt": GPTPretrainConfig,
    "resnet": ResNetJobConfig,
    "tune": TuneJobConfig,
    "data": DataPrepareConfig,
}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads(path):
    cls = next(c for prefix, c in JOB_CLASSES.items() if path.name.startswith(prefix))
    cfg = load_config(cls, path)
    assert cfg is not None


def test_overrides_convert_types():
    cfg = load_config(
        GPTPretrainConfig,
        CONFIGS / "gpt_tiny.yaml",
        ["train.lr=3e-4", "deepspeed.zero_stage=3", "scaling.use_gpu=false", "run.name=x", "data.text_files=[a.txt]"],
    )
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.deepspeed.zero_stage == 3
    assert cfg.scaling.use_gpu is False
    assert cfg.run.name == "x"
    assert cfg.data.text_files == ["a.txt"]
    # keys not named keep the preset's values
    assert cfg.train.max_steps == yaml.safe_load((CONFIGS / "gpt_tiny.yaml").read_text())["train"]["max_steps"]


def test_partial_section_keeps_job_defaults():
    cfg = load_config(GPTPretrainConfig, None, ["run.storage_path=/tmp/x"])
    assert cfg.run.name == "gpt"  # the GPT job's default run name survives a partial override


@pytest.mark.parametrize(
    "cls, override, key, words",
    [
        (GPTPretrainConfig, "deepspeed.zero_stage=4", "deepspeed.zero_stage", "0, 1, 2 or 3"),
        (GPTPretrainConfig, "train.micro_batch_size=0", "train.micro_batch_size", ">= 1"),
        (GPTPretrainConfig, "train.lr=fast", "train.lr", "expected a number"),
        (GPTPretrainConfig, "train.max_steps=1.5", "train.max_steps", "expected an integer"),
        (GPTPretrainConfig, "scaling.use_gpu=maybe", "scaling.use_gpu", "true or false"),
        (GPTPretrainConfig, "model.preset=huge", "model.preset", "not a gpt2 preset; allowed: tiny, 124m"),
        (GPTPretrainConfig, "deepspeed.precision=fp8", "deepspeed.precision", "'bf16'"),
        (GPTPretrainConfig, "deepspeed.offload_params=true", "deepspeed.offload_params", "zero_stage 3"),
        (GPTPretrainConfig, "trian.lr=1", "trian", "unknown key"),
        (GPTPretrainConfig, "train.lrr=1", "train.lrr", "unknown key"),
        (GPTPretrainConfig, "run.name=a/b", "run.name", "without '/'"),
        (GPTPretrainConfig, "scaling.num_workers=0", "scaling.num_workers", ">= 1"),
        (ResNetJobConfig, "train.batch_size=-1", "train.batch_size", ">= 0"),
        (ResNetJobConfig, "model.arch=vgg", "model.arch", "'resnet18'"),
        (ResNetJobConfig, "data.dataset=mnist", "data.dataset", "'fashion_mnist'"),
        (GPTPretrainConfig, "deepspeed.offload_device=nvme", "deepspeed.offload_device", "zero_stage 3"),
        (GPTFinetuneConfig, "init_from=", "init_from", "base model"),
        (TuneJobConfig, "tune.scheduler=hyperband", "tune.scheduler", "'asha'"),
        (TuneJobConfig, "trainer.train.epochs=0", "trainer.train.epochs", ">= 1"),
        (TuneJobConfig, "tune.space={train.lrr: {loguniform: [0.01, 0.1]}}", "tune.space.train.lrr", "unknown key"),
        (TuneJobConfig, "tune.space={train.lr: {normal: [0, 1]}}", "tune.space.train.lr", "loguniform"),
        (DataPrepareConfig, "text.vocab_size=10", "text.vocab_size", "260..262144"),
    ],
)
def test_validation_errors_name_the_key(cls, override, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(cls, None, [override])
    assert err.value.key == key
    assert words in str(err.value)


def test_a_global_batch_derives_the_accumulation_at_any_world_size():
    train = load_config(GPTPretrainConfig, None, ["train.global_batch_size=32", "train.micro_batch_size=4"]).train
    assert [train.accumulation(n) for n in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(
        ConfigError, match=r"train.micro_batch_size \(4\) x scaling.num_workers \(3\) = 12 must divide it"
    ) as err:
        train.accumulation(3)
    assert err.value.key == "train.global_batch_size"
    legacy = load_config(GPTPretrainConfig, None, ["train.grad_accum_steps=3"]).train
    assert [legacy.accumulation(n) for n in (1, 2)] == [3, 3]  # without a global batch the batch follows the world size
    with pytest.raises(ConfigError, match="derived from train.global_batch_size"):
        load_config(GPTPretrainConfig, None, ["train.global_batch_size=32", "train.grad_accum_steps=2"])


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("port=70000", "port", "65535"),
        ("dtype=float16", "dtype", "'bfloat16'"),
        ("gpt.max_batch_size=0", "gpt.max_batch_size", ">= 1"),
        ("resnet.max_batchsize=4", "resnet.max_batchsize", "unknown key"),
    ],
)
def test_serve_settings_errors_name_the_key(override, key, words):
    from bigray.config import load_config
    from bigray.serve.settings import ServeArgs

    with pytest.raises(ConfigError) as err:
        load_config(ServeArgs, None, [override])
    assert err.value.key == key
    assert words in str(err.value)


def test_serve_shortcuts_set_both_deployments():
    from bigray.config import load_config
    from bigray.serve.settings import ServeArgs

    settings = load_config(
        ServeArgs, None, ["dtype=bfloat16", "num_gpus=1", "gpt.max_batch_size=4", "access_log=false"]
    )
    app = settings.app_args()
    assert (app.gpt.dtype, app.resnet.dtype, app.gpt.num_gpus, app.resnet.num_gpus) == ("bfloat16", "bfloat16", 1, 1)
    assert app.gpt.max_batch_size == 4 and settings.access_log is False
    assert load_config(ServeArgs).app_args().gpt.dtype == "float32"  # no shortcut: each deployment's own


def test_serving_beyond_loopback_without_a_key_is_refused(capsys, monkeypatch, tmp_path):
    from bigray.cli import main

    monkeypatch.delenv("BIGRAY_API_KEY", raising=False)
    # before any checkpoint or Ray work
    assert main(["serve", "--gpt", str(tmp_path / "ckpt"), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "config error at 'host': serving on 0.0.0.0 (beyond this machine) needs an API key" in err, err
    # with a key (or allow_unauthenticated) the next check is the checkpoint's
    monkeypatch.setenv("BIGRAY_API_KEY", "k")
    assert main(["serve", "--gpt", str(tmp_path / "ckpt"), "--host", "0.0.0.0"]) == 2
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.delenv("BIGRAY_API_KEY")
    assert (
        main(["serve", "--gpt", str(tmp_path / "ckpt"), "--host", "0.0.0.0", "--set", "allow_unauthenticated=true"])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(GPTPretrainConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(GPTPretrainConfig, bad)
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(GPTPretrainConfig, None, ["no-equals-sign"])


def test_cli_reports_config_error(capsys):
    from bigray.cli import main

    assert main(["data", "prepare", "--set", "text.val_fraction=0.9"]) == 2
    err = capsys.readouterr().err
    assert "text.val_fraction" in err and "(0, 0.5)" in err


def test_nvme_offload_builds_a_zero_infinity_config():
    from bigray.train.engine import deepspeed_config

    cfg = load_config(
        GPTPretrainConfig,
        CONFIGS / "gpt_tiny.yaml",
        [
            "deepspeed.zero_stage=3",
            "deepspeed.offload_optimizer=true",
            "deepspeed.offload_device=nvme",
            "deepspeed.nvme_path=/scratch",
            "deepspeed.precision=fp32",
        ],
    )
    ds = deepspeed_config(cfg.deepspeed, cfg.train, world_size=2, use_gpu=False)
    assert ds["zero_optimization"]["offload_optimizer"] == {
        "device": "nvme",
        "pin_memory": False,
        "nvme_path": "/scratch",
    }
    assert "offload_param" not in ds["zero_optimization"] and ds["aio"]["block_size"] == 1 << 20
    with pytest.raises(ConfigError, match="nvme_path"):
        load_config(
            GPTPretrainConfig,
            None,
            ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true", "deepspeed.offload_device=nvme"],
        )


def test_pbt_needs_the_random_searcher_and_no_grid():
    with pytest.raises(ConfigError, match="PBT explores by itself") as err:
        load_config(TuneJobConfig, CONFIGS / "tune_gpt.yaml", ["tune.scheduler=pbt"])  # tune_gpt.yaml uses optuna
    assert err.value.key == "tune.searcher"
    from bigray.tune import pbt_mutations

    with pytest.raises(ConfigError, match="not a grid"):
        pbt_mutations({"train.lr": {"grid": [0.1, 0.01]}})


def test_serve_args_read_a_ray_serve_config_file(tmp_path):
    """`jobs/serve_app.py --config serve/cluster-config.yaml` reads the file `serve deploy` takes:
    its bigray app's args, host and port from http_options, then the --set overrides."""
    from bigray.config import load_config
    from bigray.serve.settings import ServeArgs

    args = load_config(ServeArgs, REPO / "serve" / "cluster-config.yaml", ["port=9000", "gpt.num_gpus=0"])
    assert (args.host, args.port, args.gpt.num_gpus, args.resnet.num_gpus) == ("0.0.0.0", 9000, 0, 0.25)
    assert args.api_key_file == "/home/ray/.bigray/api-key" and args.gpt.accelerator_type == "A10G"
    app = yaml.safe_load((REPO / "serve" / "cluster-config.yaml").read_text())["applications"][0]
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump({"applications": [app, {**app, "name": "again"}]}))
    with pytest.raises(ConfigError, match="one bigray app .*found 2"):
        load_config(ServeArgs, two)


def test_a_placeholder_location_is_refused_before_anything_runs():
    from bigray.recipes.preflight import check_shared_locations

    with pytest.raises(
        ConfigError, match=r"at 'data.cache_dir': s3://YOUR-BUCKET/bigray-data still holds a placeholder"
    ):
        check_shared_locations({"run.storage_path": "s3://mine/runs", "data.cache_dir": "s3://YOUR-BUCKET/bigray-data"})


SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize(
    "cls, key, uri",
    [
        (GPTPretrainConfig, "run.storage_path", f"s3://AKIAEXAMPLE:{SECRET}@bucket/runs"),
        (GPTPretrainConfig, "data.cache_dir", f"s3://bucket/data?access_key=AKIAEXAMPLE&secret_key={SECRET}"),
        (GPTPretrainConfig, "resume_from", f"gs://bucket/ckpt?access_token={SECRET}"),
        (GPTPretrainConfig, "tracking.uri", f"https://me:{SECRET}@mlflow.example.com"),
        (ResNetJobConfig, "data.root", f"s3://bucket/images?endpoint_override=http://minio:{SECRET}@minio:9000"),
        (GPTFinetuneConfig, "init_from", f"s3://bucket/base?session_token={SECRET}"),
    ],
)
def test_locations_with_credentials_are_refused_naming_the_key(cls, key, uri):
    overrides = [f"{key}={uri}"] + (["data.train_files=[x.jsonl]"] if cls is GPTFinetuneConfig else [])
    with pytest.raises(ConfigError) as err:
        load_config(cls, None, overrides)
    assert err.value.key == key and "holds credentials" in str(err.value)
    assert SECRET not in str(err.value)


def test_a_job_with_a_secret_in_a_location_writes_nothing_that_holds_it(capsys, tmp_path, monkeypatch):
    from bigray.cli import main

    monkeypatch.chdir(tmp_path)
    uri = f"s3://bucket/x?access_key=AKIAEXAMPLE&secret_key={SECRET}"
    for command in (
        ["pretrain-gpt", "--set", f"run.storage_path={uri}"],
        ["data", "prepare", "--set", f"text.text_files=['{uri}']"],
    ):
        assert main([*command, "--set", f"run.name=secret-{command[0]}"]) == 2
        err = capsys.readouterr().err
        assert "holds credentials" in err and SECRET not in err
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in written if SECRET.encode() in p.read_bytes()]


def test_a_resnet_batch_is_set_per_worker_or_globally_not_both():
    with pytest.raises(ConfigError, match=r"'train.batch_size'.*derived from train.global_batch_size.*one of the two"):
        load_config(ResNetJobConfig, None, ["train.batch_size=16", "train.global_batch_size=64"])


def test_a_worker_range_is_read_from_yaml_and_set_and_a_range_that_cannot_work_is_refused(small_text, tmp_path):
    from bigray.recipes.gpt import prepare_pretrain
    from bigray.recipes.resnet import prepare_resnet

    for raw, parsed in (("1..2", [1, 2]), ("[1, 3]", [1, 3]), ("2..2", 2), ("2", 2)):
        scaling = load_config(GPTPretrainConfig, CONFIGS / "gpt_tiny.yaml", [f"scaling.num_workers={raw}"]).scaling
        assert scaling.num_workers == parsed and scaling.elastic == isinstance(parsed, list), raw
    path = tmp_path / "elastic.yaml"
    path.write_text(yaml.safe_dump({"scaling": {"num_workers": [2, 4]}}))
    scaling = load_config(GPTPretrainConfig, path).scaling
    assert (scaling.min_workers, scaling.max_workers, list(scaling.world_sizes())) == (2, 4, [2, 3, 4])
    for raw in ("3..2", "0..2", "[0, 2]"):
        with pytest.raises(ConfigError, match=r"at 'scaling.num_workers': a worker range needs 1 <= min <= max"):
            load_config(GPTPretrainConfig, CONFIGS / "gpt_tiny.yaml", [f"scaling.num_workers={raw}"])
    with pytest.raises(ConfigError, match="scaling.num_workers.*got 'two'"):
        load_config(GPTPretrainConfig, CONFIGS / "gpt_tiny.yaml", ["scaling.num_workers=two"])

    # an elastic run trains the same batches at every world size: it needs a global batch that splits over each
    text_cfg, _ = small_text
    data = [f"data.cache_dir={text_cfg.cache_dir}", f"data.max_chars={text_cfg.max_chars}", "data.vocab_size=512"]
    gpt = [*data, "model.block_size=64", "train.micro_batch_size=4", f"run.storage_path={tmp_path}"]
    with pytest.raises(ConfigError, match=r"'train.global_batch_size': scaling.num_workers is a range \(1..2\)"):
        prepare_pretrain(load_config(GPTPretrainConfig, CONFIGS / "gpt_tiny.yaml", [*gpt, "scaling.num_workers=1..2"]))
    with pytest.raises(ConfigError, match=r"16 sequences do not split into micro batches on 3 workers"):
        prepare_pretrain(
            load_config(
                GPTPretrainConfig,
                CONFIGS / "gpt_tiny.yaml",
                [*gpt, "scaling.num_workers=1..4", "train.global_batch_size=16"],
            )
        )
    prepare_pretrain(
        load_config(
            GPTPretrainConfig,
            CONFIGS / "gpt_tiny.yaml",
            [*gpt, "scaling.num_workers=1..2", "train.global_batch_size=16"],
        )
    )
    resnet = [f"run.storage_path={tmp_path}", "scaling.num_workers=2..3"]
    with pytest.raises(ConfigError, match=r"'train.global_batch_size': scaling.num_workers is a range \(2..3\)"):
        prepare_resnet(
            load_config(ResNetJobConfig, CONFIGS / "resnet_fashion.yaml", [*resnet, "train.global_batch_size=0"])
        )
    with pytest.raises(ConfigError, match=r"64 images do not split over 3 workers \(scaling.num_workers \[2, 3\]\)"):
        prepare_resnet(
            load_config(ResNetJobConfig, CONFIGS / "resnet_fashion.yaml", [*resnet, "train.global_batch_size=64"])
        )


def test_elastic_trials_that_can_never_run_at_once_are_refused_naming_the_key(ray_cluster):
    """The shared test cluster holds 4 one-CPU workers: 3 trials of at least 2 can never run together."""
    from bigray.tune import concurrent_trials

    def search(*overrides):
        job = load_config(TuneJobConfig, CONFIGS / "tune_gpt.yaml", ["trainer.scaling.num_workers=2..4", *overrides])
        return concurrent_trials(job, job.trainer_config())

    with pytest.raises(ConfigError, match=r"'tune.max_concurrent_trials': 3 trials of at least 2 workers .* at most 4"):
        search("tune.max_concurrent_trials=3")
    assert search("tune.max_concurrent_trials=2") == 2
    assert search() == 1  # counted at their largest: one trial of 4
