"""deploy/kserve/: each InferenceService validated offline against the v1beta1 fields KServe's
CRD requires of a custom predictor (a JSON schema transcribed from the CRD's structure,
checked with jsonschema_rs), and the protocol settings a v2 predictor needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import PROJECT_ROOT

jsonschema_rs = pytest.importorskip("jsonschema_rs", reason="jsonschema_rs is not installed")

KSERVE_DIR = PROJECT_ROOT / "deploy" / "kserve"
DNS_1123 = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {
        "name": {"type": "string", "pattern": DNS_1123},
        "image": {"type": "string", "minLength": 1},
        "command": {"type": "array", "items": {"type": "string"}},
        "env": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "value": {"type": "string"}},
            },
        },
        "ports": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["containerPort"],
                "properties": {"containerPort": {"type": "integer", "minimum": 1}},
            },
        },
    },
}
INFERENCE_SERVICE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1beta1"},
        "kind": {"const": "InferenceService"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "pattern": DNS_1123, "maxLength": 63}},
        },
        "spec": {
            "type": "object",
            "required": ["predictor"],
            "properties": {
                "predictor": {
                    "type": "object",
                    "required": ["containers"],
                    "properties": {
                        "minReplicas": {"type": "integer", "minimum": 0},
                        "maxReplicas": {"type": "integer", "minimum": 0},
                        "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
                        "scaleTarget": {"type": "integer", "minimum": 1},
                        "containerConcurrency": {"type": "integer", "minimum": 0},
                        "containers": {"type": "array", "minItems": 1, "items": CONTAINER},
                    },
                }
            },
        },
    },
}
FILES = sorted(KSERVE_DIR.glob("*.yaml"))


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_inference_service(path: Path) -> None:
    obj = _load(path)
    jsonschema_rs.validator_for(INFERENCE_SERVICE).validate(obj)
    predictor = obj["spec"]["predictor"]
    assert predictor["scaleMetric"] == "concurrency"
    assert predictor["minReplicas"] <= predictor["maxReplicas"]
    (container,) = predictor["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PROTOCOL"] == "v2"
    assert [p["containerPort"] for p in container["ports"]] == [8080]
    assert "8080" in container["command"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}


def test_a_gpu_variant() -> None:
    gpu = [p for p in FILES if "nvidia.com/gpu" in str(_load(p))]
    assert gpu, "no InferenceService asks for a GPU"
    (container,) = _load(gpu[0])["spec"]["predictor"]["containers"]
    assert {e["name"]: e["value"] for e in container["env"]}["MIDSERVE_DEVICE"] == "cuda"
