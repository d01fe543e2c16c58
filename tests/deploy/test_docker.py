"""The CPU image and docker-compose.yml for real, checked as a user would: `make docker-test` builds the image from
the Dockerfile, then these run it. Marked `docker` (a Docker engine and the built image): left out of `make test`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import REPO, run_cli

pytestmark = pytest.mark.docker

DOCKER = os.environ.get("DOCKER", "docker")
IMAGE = os.environ.get("DOCKER_IMAGE", "gpt-onnx-serve:cpu")
RUN_ARGS = os.environ.get("DOCKER_RUN_ARGS", "").split()  # e.g. `--gpus all` to check the GPU image on a GPU host
PROJECT = "gpt-docker-test"  # compose project name: its containers and network, apart from any a user runs
STARTUP_S = 300  # the image's healthcheck starts after 15 s; a loaded 2-core machine can take minutes to load


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {result.returncode}\n{result.stdout}{result.stderr}")
    return result


def compose_command() -> list[str]:
    """`docker compose` (the v2 plugin) where installed, else Debian's `docker-compose` 1.29: both read the file."""
    if subprocess.run([DOCKER, "compose", "version"], capture_output=True).returncode == 0:
        return [DOCKER, "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` nor `docker-compose` is installed")


def wait_healthy(container: str) -> None:
    """Polls the container's own HEALTHCHECK status (what `docker ps` shows) until healthy."""
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        state = json.loads(docker("inspect", "-f", "{{json .State}}", container).stdout)
        if not state["Running"] or state.get("Health", {}).get("Status") == "unhealthy":
            break
        if state["Health"]["Status"] == "healthy":
            return
        time.sleep(1)
    logs = docker("logs", "--tail", "40", container, check=False)
    pytest.fail(f"{container} not healthy: {state}\n{logs.stdout}{logs.stderr}")


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which(DOCKER) is None or docker("info", check=False).returncode != 0:
        pytest.fail("no Docker engine answers (make docker-test starts from a running dockerd)")
    if docker("image", "inspect", IMAGE, check=False).returncode != 0:
        pytest.fail(f"{IMAGE} is not built: make docker-test builds it")
    return IMAGE


@contextlib.contextmanager
def running(image: str, *extra: str) -> Iterator[tuple[str, str]]:
    """The image as deploy/README.md runs it, read-only root and a tmpfs /tmp (`extra`: more `docker run` options),
    until healthy -> (container id, base URL); removed after. Docker picks the host port itself (-p 127.0.0.1::8000)
    and says which: no port is chosen here and raced for."""
    args = ("--read-only", "--tmpfs", "/tmp", "-p", "127.0.0.1::8000", *extra, *RUN_ARGS)
    cid = docker("run", "-d", *args, image).stdout.strip()
    try:
        wait_healthy(cid)
        address = docker("port", cid, "8000/tcp").stdout.split()[0]  # 127.0.0.1:NNNNN
        yield cid, f"http://{address}"
    finally:
        docker("rm", "-f", cid, check=False)


@pytest.fixture(scope="module")
def container(image: str) -> Iterator[tuple[str, str]]:
    """With a stop timeout (Docker's default, 10 s, would kill a draining server) that covers the drain and uvicorn's
    graceful shutdown."""
    with running(image, "--stop-timeout", "70") as started:
        yield started


def test_readme_curl_streams_an_answer(container):
    cid, url = container
    readme = (REPO / "README.md").read_text()
    curl = re.search(r"```\n(curl -N localhost:8000/v1/chat/completions .*?)\n```", readme, re.S)
    assert curl, "the README's streaming curl example"
    command = curl.group(1).replace("localhost:8000", url.removeprefix("http://"))
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    events = [line.removeprefix("data: ") for line in out.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert len(chunks) > 3 and text.strip(), out.stdout[-2000:]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_openai_client_gets_a_completion(container):
    _, url = container
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    (model,) = [m.id for m in client.models.list().data]
    r = client.completions.create(model=model, prompt="The three primary colors are", max_tokens=8, temperature=0)
    assert r.choices[0].text.strip() and r.usage is not None and 0 < r.usage.completion_tokens <= 8
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.content


def test_healthcheck_reports_healthy(container):
    cid, _ = container
    health = json.loads(docker("inspect", "-f", "{{json .State.Health}}", cid).stdout)
    assert health["Status"] == "healthy"
    assert health["Log"] and health["Log"][-1]["ExitCode"] == 0


def test_runs_as_uid_10001_on_a_read_only_root(container):
    cid, _ = container
    status = docker("exec", cid, "cat", "/proc/1/status").stdout
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert set(uids) == {"10001"}, status
    assert docker("inspect", "-f", "{{.Config.User}}", cid).stdout.strip() == "10001:10001"
    assert docker("inspect", "-f", "{{.HostConfig.ReadonlyRootfs}}", cid).stdout.strip() == "true"
    for path in ("/app/x", "/bundles/default/x", "/x"):
        touch = docker("exec", cid, "touch", path, check=False)
        assert touch.returncode != 0 and "Read-only file system" in touch.stderr, (path, touch.stderr)


def test_image_holds_no_torch_and_no_pip_cache(image):
    found = docker(
        "run", "--rm", "--user", "0", "--entrypoint", "sh", image, "-c",
        "find / -xdev \\( -name torch -o -name 'torch-*.dist-info' -o -path '*/.cache/pip' \\) -print",
    )  # fmt: skip
    assert found.stdout.strip() == "", found.stdout
    listed = docker("run", "--rm", "--entrypoint", ".venv/bin/python", image, "-m", "pip", "list", "--format=json")
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "onnxruntime-gpu" in names and "fastapi" in names and "torch" not in names


def test_baked_bundle_runs_on_the_projects_cpu_ops(container):
    """The build stage compiles ortkernels/ and exports the fp32 bundle onto its CausalAttention and SwiGLU; the
    runtime stage carries the library (it has no compiler), and the engine says which code the CPU runs."""
    cid, _ = container
    out = docker("logs", cid)
    logs = out.stdout + out.stderr
    ops = r"ortkernels/ on the CPU: CausalAttention \((avx512|avx2|generic) code\), SwiGLU"
    assert re.search(ops, logs), logs[-3000:]
    assert "golden outputs reproduce" in logs


def test_docker_stop_drains_a_running_stream(container):
    """Last of the container's tests: it stops it. SIGTERM mid-stream: /ready fails, a new request gets 503
    `draining`, the running stream still gets every token it asked for, and the process exits 0 (not killed)."""
    cid, url = container
    # Long enough to be running when the signal lands, short enough for the 30 s drain on a loaded 2-core machine.
    tokens = 64
    body = {
        "model": httpx.get(url + "/v1/models").json()["data"][0]["id"],
        "prompt": "Once upon a time",
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started, events = threading.Event(), []

    def read_stream() -> None:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    started.set()
        started.set()

    reader = threading.Thread(target=read_stream, daemon=True)
    reader.start()
    assert started.wait(120) and events, "the stream never started"
    stop = subprocess.Popen([DOCKER, "stop", cid], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while reader.is_alive() and httpx.get(url + "/ready", timeout=10).status_code != 503:
        time.sleep(0.05)
    assert reader.is_alive(), "the stream ended before the drain began: ask for more tokens"
    refused = httpx.post(url + "/v1/completions", json={**body, "stream": False, "max_tokens": 1}, timeout=30)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    reader.join(300)
    assert stop.wait(120) == 0, stop.stderr.read() if stop.stderr else ""
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == tokens
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    state = json.loads(docker("inspect", "-f", "{{json .State}}", cid).stdout)
    assert state["ExitCode"] == 0 and not state["OOMKilled"], state
    assert "draining" in docker("logs", cid).stderr


def test_a_mounted_int4_bundle_serves_on_matmulq4_1(image, tmp_path):
    """A user's int4 bundle (the default GGUF's Q4_1 blocks, exported on the host) mounted read-only over the baked
    one: the image's ortkernels/ runs its MatMulQ4_1, the golden outputs reproduce, and it answers."""
    bundle = tmp_path / "int4"
    export = run_cli("export", "--source", "default", "--out", str(bundle), "--quantize", "int4")
    assert export.returncode == 0, export.stdout[-2000:] + export.stderr[-2000:]
    assert "MatMulQ4_1" in json.loads((bundle / "manifest.json").read_text())["graph"]["kernels"]
    with running(image, "-v", f"{bundle}:/bundles/default:ro") as (cid, url):
        out = docker("logs", cid)
        logs = out.stdout + out.stderr
        assert re.search(r"MatMulQ4_1 \((avx512vnni|avx2|generic) code\)", logs), logs[-3000:]
        assert "golden outputs reproduce" in logs and "int4" in logs
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        (model,) = [m.id for m in client.models.list().data]
        r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
        assert r.choices[0].text.strip() and r.usage is not None and r.usage.completion_tokens == 8


def running_services() -> list[str]:
    """The compose services of this project with a running container (`ps --services` of compose 1.29 lists all)."""
    out = docker("ps", "--filter", f"label=com.docker.compose.project={PROJECT}", "--format", "{{json .Labels}}")
    labels = [dict(kv.split("=", 1) for kv in json.loads(line).split(",")) for line in out.stdout.splitlines()]
    return sorted(label["com.docker.compose.service"] for label in labels)


@pytest.fixture()
def compose(image: str, tmp_path: Path) -> Iterator:
    """`compose(profile)` brings a profile of docker-compose.yml up (images already built); all of it comes down."""
    command = [*compose_command(), "-p", PROJECT, "-f", str(REPO / "docker-compose.yml")]
    # "127.0.0.1:" makes each mapping 127.0.0.1::PORT: Docker picks the host port; `port` reads it back below.
    env = {**os.environ, "GPT_PORT": "127.0.0.1:", "NGINX_PORT": "127.0.0.1:"}
    ports: dict[str, str] = {}
    profiles: list[str] = []

    def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        flags = [arg for p in profiles for arg in ("--profile", p)]
        result = subprocess.run([*command, *flags, *args], env=env, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout}{result.stderr}"
        return result

    def up(profile: str) -> tuple[dict[str, str], object]:
        profiles.append(profile)
        run("up", "-d", "--no-build")
        for cid in run("ps", "-q").stdout.split():
            wait_healthy(cid)
        for key, service, port in (("GPT_PORT", "gpt-cpu", "8000"), ("NGINX_PORT", "nginx-cpu", "8080")):
            published = subprocess.run(
                [*command, *(arg for p in profiles for arg in ("--profile", p)), "port", service, port],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout.strip()
            if published:  # host:port of the service this profile runs
                ports[key] = published.rsplit(":", 1)[1]
        return ports, run

    yield up
    if profiles:
        run("down", "--timeout", "90")


def test_compose_cpu_profile_serves(compose):
    ports, run = compose("cpu")
    assert running_services() == ["gpt-cpu"]  # the profile starts its own service only
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports['GPT_PORT']}/v1", api_key="unused")
    (model,) = [m.id for m in client.models.list().data]
    r = client.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0)
    assert r.choices[0].text


def test_compose_two_replicas_behind_nginx_serve_a_locust_run(compose, tmp_path):
    ports, run = compose("scale-cpu")
    assert running_services() == ["gpt-cpu-1", "gpt-cpu-2", "nginx-cpu"]
    result = run_cli(
        "loadtests.run",
        *("--host", f"http://127.0.0.1:{ports['NGINX_PORT']}", "--users", "4", "--spawn-rate", "4"),
        *("--duration", "15s", "--out", str(tmp_path / "lt")),
        env={"LOADTEST_PROMPT_TOKENS": "16", "LOADTEST_OUTPUT_TOKENS": "16"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "lt" / "summary.json").read_text())
    assert summary["requests"] > 0 and summary["failures"] == 0, summary
    for replica in ("gpt-cpu-1", "gpt-cpu-2"):  # least_conn spread the run over both
        metrics = run("exec", "-T", replica, "curl", "-fsS", "http://127.0.0.1:8000/metrics").stdout
        served = sum(float(m.split()[-1]) for m in metrics.splitlines() if m.startswith("request_success_total{"))
        assert served > 0, replica
