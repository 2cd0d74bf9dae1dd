"""Compose files, Prometheus config, Grafana provisioning and Kubernetes manifests.

`docker-compose config` (Debian's docker-compose, no engine needed) validates each file set
against the Compose schema and resolves extends/overrides; promtool checks the Prometheus
config. The rest checks that the pieces point at each other: mounts that exist, the
dashboard's datasource uid, probes on real routes, an HPA on a metric the server exports.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.metrics import Metrics
from tests.deploy.tools import COMPOSE_FILES, DASHBOARD, DOCKER_DIR, MISSING, find_tool
from tests.helpers import PROJECT_ROOT

K8S_DIR = PROJECT_ROOT / "deploy" / "k8s"


def compose_config(files: list[str]) -> dict[str, Any]:
    tool = find_tool("docker-compose")
    if tool is None:
        pytest.skip(MISSING["docker-compose"])
    cmd = [tool]
    for f in files:
        cmd += ["-f", str(PROJECT_ROOT / f)]
    res = subprocess.run(
        [*cmd, "config"], capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT,
        env={"PATH": "/usr/bin:/bin"},  # defaults only: no MIDSERVE_* from the caller
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "WARNING" not in res.stderr, res.stderr
    return yaml.safe_load(res.stdout)


def exported_metric_names() -> set[str]:
    return {family.name for family in Metrics().registry.collect()}


@pytest.mark.parametrize("stack", list(COMPOSE_FILES))
def test_compose_files_validate_and_wire_the_stack(stack: str) -> None:
    cfg = compose_config(COMPOSE_FILES[stack])
    services = cfg["services"]
    assert {"midserve", "prometheus", "grafana"} <= set(services)
    ms = services["midserve"]
    assert ms["environment"]["MIDSERVE_MODELS_DIR"] == "/app/models"
    assert json.loads(ms["environment"]["MIDSERVE_MODELS"]) == ["tf_efficientnet_lite0"]
    assert any(v.endswith(":/app/models:ro") for v in ms["volumes"])
    assert "/readyz" in " ".join(ms["healthcheck"]["test"])
    for name in ("midserve", "prometheus", "grafana"):
        assert "healthcheck" in services[name], name
        for volume in services[name].get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("/"):  # a bind mount: the file or folder must exist
                assert Path(source).exists(), f"{name} mounts missing {source}"
    prom_mounts = " ".join(services["prometheus"]["volumes"])
    assert f"{DOCKER_DIR}/prometheus.yml:/etc/prometheus/prometheus.yml" in prom_mounts
    if "gpu" in stack:
        devices = ms["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        assert ms["environment"]["MIDSERVE_DEVICE"] == "cuda"
        assert ms["build"]["args"]["TORCH_INDEX_URL"].rsplit("/", 1)[-1].startswith("cu")
    else:
        assert ms["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")
    if stack.startswith("scale"):
        assert ms["deploy"]["replicas"] == 3 and "ports" not in ms  # only nginx is published
        lb = services["lb"]
        assert lb["depends_on"]["midserve"]["condition"] == "service_healthy"
        assert any(p["target"] == 8000 for p in lb["ports"])
        check_nginx_mounts(lb["volumes"])
    else:
        assert any(p["target"] == 8000 for p in ms["ports"])


def check_nginx_mounts(volumes: list[str]) -> None:
    """The balancer gets the server block as conf.d/default.conf (which the image's
    nginx.conf includes) and every file it includes where nginx looks for it (relative
    includes resolve against /etc/nginx). tests/reliability/test_failover.py runs the same
    two files."""
    mounts = {}
    for volume in volumes:
        source, target = volume.split(":")[:2]
        assert Path(source).is_file(), f"lb mounts missing {source}"
        mounts[target] = Path(source)
    server_block = mounts["/etc/nginx/conf.d/default.conf"]
    assert server_block == DOCKER_DIR / "nginx" / "midserve.conf"
    includes = re.findall(r"^\s*include\s+([^;]+);", server_block.read_text(), re.MULTILINE)
    assert includes, "the server block includes the proxy settings"
    for name in includes:
        target = name if name.startswith("/") else f"/etc/nginx/{name}"
        assert target in mounts, f"{server_block.name} includes {name}, not mounted at {target}"
        assert mounts[target].parent == server_block.parent


def test_compose_validation_catches_a_misspelt_key(tmp_path: Path) -> None:
    """The validator is worth trusting: a typo in a service key fails `config`."""
    tool = find_tool("docker-compose")
    if tool is None:
        pytest.skip(MISSING["docker-compose"])
    bad = tmp_path / "docker-compose.yml"
    text = (PROJECT_ROOT / "docker-compose.yml").read_text()
    bad.write_text(text.replace("healthcheck:", "helthcheck:", 1))
    res = subprocess.run([tool, "-f", str(bad), "config"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)  # fmt: skip
    assert res.returncode != 0 and "helthcheck" in res.stderr


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = find_tool("promtool")
    if promtool is None:
        pytest.skip(MISSING["promtool"])
    res = subprocess.run([promtool, "check", "config", str(DOCKER_DIR / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr


def test_prometheus_finds_midserve_replicas_by_service_name() -> None:
    cfg = yaml.safe_load((DOCKER_DIR / "prometheus.yml").read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "midserve")
    assert job["metrics_path"] == "/metrics"
    assert job["dns_sd_configs"] == [
        {"names": ["midserve"], "type": "A", "port": 8000, "refresh_interval": "10s"}
    ]


def test_grafana_provisioning_points_at_the_dashboard_and_its_datasource() -> None:
    prov = DOCKER_DIR / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    boards = yaml.safe_load((prov / "dashboards" / "midserve.yml").read_text())["providers"][0]
    assert boards["options"]["path"] == "/var/lib/grafana/dashboards"  # compose mounts it there
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])} | {
        p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p
    }
    assert uids == {ds["uid"]}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def k8s_objects() -> dict[str, dict[str, Any]]:
    objs: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                objs[doc["kind"]] = doc
    return objs


def test_kubernetes_manifests_fit_together() -> None:
    objs = k8s_objects()
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= set(objs)
    dep, svc, hpa = objs["Deployment"], objs["Service"], objs["HorizontalPodAutoscaler"]
    pod = dep["spec"]["template"]
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["midserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert svc["spec"]["ports"][0]["targetPort"] in ports
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001  # the image's USER
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    metric = hpa["spec"]["metrics"][0]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] in exported_metric_names()


def test_adapter_rule_serves_the_metric_the_hpa_reads() -> None:
    objs = k8s_objects()
    rules = yaml.safe_load(objs["ConfigMap"]["data"]["config.yaml"])["rules"]
    hpa_metric = objs["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    served = [r for r in rules if r["name"]["as"] == hpa_metric]
    assert served and served[0]["seriesQuery"].startswith(hpa_metric + "{")
