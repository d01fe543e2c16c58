"""A real uvicorn server on 127.0.0.1, started as a user would: `python -m service --bundle ... --port ...`."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers import REPO, child_env


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


LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


def start_server(bundle: Path, log: Path, *args: str, timeout: float = 180) -> Server:
    """`python -m service ... --port 0`: the kernel picks a free port and the service names it in its log line
    `listening on http://127.0.0.1:PORT`, written once the bundle is loaded and the socket bound. No port is
    chosen here and released for the server to rebind, so two servers can never race for one."""
    env = child_env()
    cmd = [sys.executable, "-m", "service", "--bundle", str(bundle), "--host", "127.0.0.1", "--port", "0", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = LISTENING.search(log.read_text())
        if found:
            server = Server(f"http://127.0.0.1:{found.group(1)}", proc, log, bundle)
            if httpx.get(server.url + "/ready", timeout=10).status_code != 200:
                raise RuntimeError(f"server listening but not ready:\n{log.read_text()}")
            return server
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"server not listening after {timeout}s:\n{log.read_text()}")


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
        "--max-num-batched-tokens",
        "48",
    )
    yield server
    stop_server(server)


# Every bundle type the exporter makes, as `python -m export` flags, keyed by the parity variant whose bound
# (export/parity.py BOUNDS) the served answers are held to. docs/EXPORT.md lists the same variants.
BUNDLE_TYPES: dict[str, list[str]] = {
    "fp32": [],  # attention and SwiGLU on the project's ops (ortkernels/: CausalAttention, SwiGLU)
    "fp32-onnxruntime": ["--kernels", "none"],  # onnxruntime's own ops only (GroupQueryAttention, Split/QuickGelu/Mul)
    "fp16": ["--dtype", "fp16"],
    "int8": ["--quantize", "int8"],
    "int4-gguf": ["--quantize", "int4"],  # the GGUF's own Q4_1 blocks carried into MatMulQ4_1 (ortkernels/)
    # the same blocks in onnxruntime's MatMulNBits, exact minimum terms as extra digits (without ortkernels/)
    "int4-gguf-matmulnbits": ["--quantize", "int4", "--int4-kernel", "matmulnbits"],
    "int4": ["--quantize", "int4", "--int4-source", "requantize"],  # re-quantized from the dequantized weights
}


@pytest.fixture(scope="session")
def q4_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama GGUF as llama.cpp lays one out (dims multiples of 32, Q4_1 linears and unembedding, 1024
    positions). Its unembedding is the embedding plus noise and its blocks' weights are halved, so greedy margins
    look like a trained model's rather than a random one's near-ties that any rounding flips."""
    import torch

    from tests.helpers import write_gguf_from_hf, write_hf_checkpoint

    src = tmp_path_factory.mktemp("q4-src")
    model = write_hf_checkpoint(src / "hf", "llama", max_position_embeddings=1024)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                p.mul_(0.5)
        embed = model.model.embed_tokens.weight
        model.lm_head.weight.copy_(embed + 0.1 * torch.randn_like(embed))
    path = src / "tiny-q4.gguf"
    tokenizer_json = (src / "hf" / "tokenizer.json").read_text()
    write_gguf_from_hf(path, model, tokenizer_json, quantize_linears=True, quantize_output=True)
    return path


@pytest.fixture(scope="session")
def q4_bundles(q4_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The bundle of one type from `q4_gguf`, exported on first use (`python -m export`, as a user runs it)."""
    from tests.helpers import run_cli

    made: dict[str, Path] = {}

    def bundle(variant: str) -> Path:
        if variant not in made:
            out = tmp_path_factory.mktemp("q4-bundles") / variant
            flags = BUNDLE_TYPES[variant]
            result = run_cli("export", "--source", str(q4_gguf), "--out", str(out), "--name", "tiny-q4", *flags)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr
            made[variant] = out
        return made[variant]

    return bundle
