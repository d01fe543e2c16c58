"""The service refuses a bundle it cannot serve faithfully: one line naming the file and the expected value, exit
status 2, no port bound. Each case tampers with a copy of a good bundle the way a bad download or a stale export
would."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from export.bundle import sha256
from service.bundle import FORMAT_VERSION
from tests.helpers import run_cli

pytestmark = pytest.mark.e2e


@pytest.fixture()
def bundle(q4_bundles, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(q4_bundles("fp32"), copy)
    return copy


def serve(bundle, *args: str):
    return run_cli("service", "--bundle", str(bundle), "--port", "0", *args, timeout=120)


def assert_refused(result, *words: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()  # log lines of the loading, then the one error
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in result.stderr, result.stderr
    for w in words:
        assert w in errors[0], errors[0]
    assert "listening on" not in result.stdout + result.stderr


def rewrite_manifest(bundle, edit) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_a_changed_weight_fails_its_checksum(bundle):
    data = bundle / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one byte flipped
    data.write_bytes(bytes(raw))
    assert_refused(serve(bundle), "model.onnx.data", "sha256")


def test_an_unknown_format_version_is_refused(bundle):
    rewrite_manifest(bundle, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    expected = f"format_version is {FORMAT_VERSION + 1}, expected {FORMAT_VERSION}"
    assert_refused(serve(bundle), "manifest.json", expected)


def test_golden_outputs_this_machine_does_not_reproduce_are_refused(bundle):
    golden = bundle / "golden.npz"
    logits = np.load(golden)["last_logits"]
    np.savez(golden, last_logits=logits + 0.5)  # beyond the fp32 bundle's logits_atol
    digest, size = sha256(golden), golden.stat().st_size  # a consistent manifest: only the values are wrong

    def edit(m):
        m["files"]["golden.npz"] = {"sha256": digest, "bytes": size}

    rewrite_manifest(bundle, edit)
    assert_refused(serve(bundle), "golden.npz", "differ from the bundle's golden outputs")
