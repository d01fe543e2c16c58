"""A real uvicorn server on 127.0.0.1, started as a user would: `python -m service --bundle ... --port ...`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers import REPO


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    bundle: Path

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def metric(self, name: str) -> float:
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, log: Path, *args: str, timeout: float = 180) -> Server:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "service", "--bundle", str(bundle), "--host", "127.0.0.1", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return Server(url, proc, log, bundle)
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server not ready after {timeout}s:\n{log.read_text()}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(30)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="session")
def default_server(default_bundle, tmp_path_factory) -> Iterator[Server]:
    server = start_server(default_bundle, tmp_path_factory.mktemp("logs") / "default.log", "--max-model-len", "1024")
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def tiny_server(tiny_bundle, tmp_path_factory) -> Iterator[Server]:
    server = start_server(
        tiny_bundle,
        tmp_path_factory.mktemp("logs") / "tiny.log",
        "--max-model-len",
        "256",
        "--max-num-seqs",
        "8",
        "--prefill-chunk",
        "32",
    )
    yield server
    stop_server(server)
