"""cluster.yaml against the Ray cluster launcher's own schema, plus the properties we promise."""

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_the_launcher_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # fills the launcher's defaults, then raises on a schema violation


def test_cluster_yaml_shape():
    text = (REPO / "cluster.yaml").read_text()
    config = yaml.safe_load(text)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["GPU"] == 0
    assert any("p5." in t["node_config"]["InstanceType"] for t in types.values())
    spot = [n for n, t in types.items() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    assert spot and all(n.replace("-spot", "-ondemand") in types for n in spot)  # on-demand fallback per spot type
    assert config["idle_timeout_minutes"] > 0 and config["max_workers"] >= 1
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    assert [p["FromPort"] for p in config["provider"]["security_group"]["IpPermissions"]] == [22]
    assert "bigray@v" in " ".join(config["setup_commands"])
    for secret in ("aws_access_key_id", "aws_secret_access_key", "AKIA"):
        assert secret not in text


def test_schema_check_rejects_a_broken_config():
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["available_node_types"]["head"]["min_workers"] = "many"
    from jsonschema import ValidationError

    with pytest.raises(ValidationError, match="'many' is not of type 'integer'"):
        validate_config(prepare_config(config))


def test_kuberay_manifests_reference_real_entry_points():
    from bigray.serve.settings import AppArgs

    job = yaml.safe_load((REPO / "jobs" / "kuberay" / "rayjob-pretrain-gpt.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    entry = job["spec"]["entrypoint"].split()
    assert (REPO / entry[1]).is_file() and (REPO / entry[entry.index("--config") + 1]).is_file()
    svc = yaml.safe_load((REPO / "serve" / "kuberay-rayservice.yaml").read_text())
    assert svc["kind"] == "RayService"
    app = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "bigray.serve.app:build_app"
    AppArgs(**app["args"])  # the typed app args accept what the manifest passes
    local = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())["applications"][0]
    assert local["import_path"] == app["import_path"]
    AppArgs(**local["args"])
