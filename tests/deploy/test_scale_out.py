"""The scale-out topology for real on loopback: two service replicas behind nginx (Debian's package), with locust
through the balancer; then one replica is killed mid-run."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys

import httpx
import pytest

from tests.e2e.conftest import start_server, stop_server
from tests.helpers import REPO, child_env, wait_for

pytestmark = pytest.mark.e2e


def start_nginx(nginx: str, upstreams, tmp_path) -> tuple[subprocess.Popen, str]:
    """nginx on a random loopback port; when another process holds that port (nginx exits with EADDRINUSE in its
    log), it is started again on another. nginx cannot bind port 0 and name it, so this retry is the hand-over."""
    template = (REPO / "deploy" / "nginx" / "nginx.conf").read_text()
    template = template.replace("/etc/nginx/gpt-upstreams.conf", str(upstreams))
    template = template.replace("/tmp/nginx-gpt", str(tmp_path / "nginx"))
    for _ in range(10):
        port = random.randrange(20000, 30000)
        (tmp_path / "nginx.conf").write_text(template.replace("listen 8080", f"listen 127.0.0.1:{port}"))
        log = tmp_path / "nginx.log"
        proc = subprocess.Popen(
            [nginx, "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=log.open("w"),
        )
        url = f"http://127.0.0.1:{port}"

        def up(url: str = url, proc: subprocess.Popen = proc) -> bool:
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None  # exited: stop waiting, look at why

        wait_for(up, "nginx to answer or exit")
        if proc.poll() is None:
            return proc, url
        if "Address already in use" not in log.read_text():
            raise RuntimeError(f"nginx exited with {proc.returncode}:\n{log.read_text()}")
    raise RuntimeError("no free port for nginx after 10 tries")


@pytest.fixture()
def topology(tiny_bundle, tmp_path):
    nginx = shutil.which("nginx") or (shutil.which("nginx", path="/usr/sbin"))
    if nginx is None:  # under .ci/run (REQUIRE_ALL_TESTS) this skip is a failure
        pytest.skip("nginx is not installed (apt-get install nginx-light; .ci/run does)")
    args = ("--max-model-len", "256", "--max-num-seqs", "8")
    replicas = [start_server(tiny_bundle, tmp_path / f"replica{i}.log", *args) for i in range(2)]
    upstreams = tmp_path / "upstreams.conf"
    upstreams.write_text(
        "".join(f"server {r.url.removeprefix('http://')} max_fails=1 fail_timeout=5s;\n" for r in replicas)
    )
    proc, url = start_nginx(nginx, upstreams, tmp_path)
    yield url, replicas
    proc.send_signal(signal.SIGQUIT)
    proc.wait(10)
    for r in replicas:
        if r.process.poll() is None:
            stop_server(r)


def served(replica) -> float:
    try:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in httpx.get(replica.url + "/metrics").text.splitlines()
            if line.startswith("request_success_total{")
        )
    except httpx.HTTPError:
        return -1.0


def locust(url, out, duration) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "loadtests.run", "--host", url, "--users", "4", "--spawn-rate", "4"]
    env = child_env(LOADTEST_PROMPT_TOKENS="16", LOADTEST_OUTPUT_TOKENS="16")
    return subprocess.Popen(
        [*cmd, "--duration", duration, "--out", str(out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(out.parent / "locust.log").open("w"),
        stdin=subprocess.DEVNULL,
    )


def test_locust_through_nginx_reaches_both_replicas(topology, tmp_path):
    url, replicas = topology
    run = locust(url, tmp_path / "lt", "8s")
    assert run.wait(300) == 0, (tmp_path / "locust.log").read_text()[-2000:]
    summary = json.loads((tmp_path / "lt" / "summary.json").read_text())
    assert summary["requests"] > 0 and summary["failures"] == 0
    assert all(served(r) > 0 for r in replicas)


def test_losing_a_replica_costs_only_its_in_flight_requests(topology, tmp_path):
    url, replicas = topology
    run = locust(url, tmp_path / "lt", "15s")
    wait_for(lambda: all(served(r) >= 2 for r in replicas), "both replicas to serve", timeout=120)
    replicas[0].process.send_signal(signal.SIGKILL)
    replicas[0].process.wait(30)  # the replica is gone
    at_loss = served(replicas[1])
    assert run.wait(300) == 0, (tmp_path / "locust.log").read_text()[-2000:]
    summary = json.loads((tmp_path / "lt" / "summary.json").read_text())
    assert summary["failures"] <= 4  # at most the 4 users' requests that were streaming from the killed replica
    assert served(replicas[1]) > at_loss  # the load went on, to the survivor
    before = served(replicas[1])
    for _ in range(5):  # after the loss, new requests go to the survivor
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
    assert served(replicas[1]) >= before + 5
