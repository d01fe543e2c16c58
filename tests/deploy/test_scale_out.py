"""The scale-out topology for real on loopback: two service replicas behind nginx (Debian's package), with locust
through the balancer; then one replica is killed mid-run."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time

import httpx
import pytest

from tests.e2e.conftest import free_port, start_server, stop_server
from tests.helpers import REPO, run_cli

pytestmark = pytest.mark.e2e


@pytest.fixture()
def topology(tiny_bundle, tmp_path):
    nginx = shutil.which("nginx") or (shutil.which("nginx", path="/usr/sbin"))
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light; .ci/run does)")
    args = ("--max-model-len", "256", "--max-num-seqs", "8")
    replicas = [start_server(tiny_bundle, tmp_path / f"replica{i}.log", *args) for i in range(2)]
    upstreams = tmp_path / "upstreams.conf"
    upstreams.write_text(
        "".join(f"server {r.url.removeprefix('http://')} max_fails=1 fail_timeout=5s;\n" for r in replicas)
    )
    port = free_port()
    conf = (REPO / "deploy" / "nginx" / "nginx.conf").read_text()
    conf = conf.replace("/etc/nginx/gpt-upstreams.conf", str(upstreams)).replace(
        "listen 8080", f"listen 127.0.0.1:{port}"
    )
    conf = conf.replace("/tmp/nginx-gpt", str(tmp_path / "nginx"))
    (tmp_path / "nginx.conf").write_text(conf)
    proc = subprocess.Popen(
        [nginx, "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "nginx.log").open("w"),
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
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


def locust(url, out, duration):
    return run_cli(
        "loadtests.run",
        "--host",
        url,
        "--users",
        "4",
        "--spawn-rate",
        "4",
        "--duration",
        duration,
        "--out",
        str(out),
        env={"LOADTEST_PROMPT_TOKENS": "16", "LOADTEST_OUTPUT_TOKENS": "16"},
    )


def test_locust_through_nginx_reaches_both_replicas(topology, tmp_path):
    url, replicas = topology
    result = locust(url, tmp_path / "lt", "8s")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "lt" / "summary.json").read_text())
    assert summary["requests"] > 10 and summary["failures"] == 0
    assert all(served(r) > 0 for r in replicas)


def test_losing_a_replica_costs_only_its_in_flight_requests(topology, tmp_path):
    url, replicas = topology
    killer = threading.Timer(4.0, lambda: replicas[0].process.send_signal(signal.SIGKILL))
    killer.start()
    result = locust(url, tmp_path / "lt", "12s")
    killer.join()
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "lt" / "summary.json").read_text())
    assert summary["requests"] > 20
    assert summary["failures"] <= 4  # at most the 4 users' requests that were streaming from the killed replica
    before = served(replicas[1])
    for _ in range(5):  # after the loss, new requests go to the survivor
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
    assert served(replicas[1]) >= before + 5
