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
    with pytest.raises(Exception):
        validate_config(prepare_config(config))
