"""The inspection graph's session and the `python -m service.inspect` CLI, against the tiny bundle."""

from __future__ import annotations

import numpy as np

from service.bundle import load_bundle
from service.inspector import Inspector, top_tokens
from tests.helpers import run_cli


def test_top_tokens_is_the_softmax_s_most_likely_first():
    logits = np.log(np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]], dtype=np.float32))
    ids, probs = top_tokens(logits, 2)
    assert ids.tolist() == [[1, 2], [0, 2]]
    assert np.allclose(probs, [[0.6, 0.3], [0.5, 0.3]], atol=1e-6)
    assert top_tokens(logits, 0)[0].shape == (2, 0)


def test_inspector_reads_the_serving_weights_and_is_causal(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    assert bundle.inspect is not None and bundle.inspect.max_tokens == 256
    inspector = Inspector(bundle.inspect, ["CPUExecutionProvider"])
    inspector.open()
    out = inspector.run([5, 6, 7, 8])
    assert out.attention.shape == (bundle.n_layer, bundle.inspect.n_head, 4, 4)
    assert out.logits.shape == (4, bundle.vocab_size)
    assert (out.attention[..., np.triu_indices(4, 1)[0], np.triu_indices(4, 1)[1]] == 0).all()
    assert np.allclose(out.attention.sum(-1), 1, atol=1e-5)
    # a prefix's outputs do not depend on what follows it
    assert np.allclose(inspector.run([5, 6]).attention, out.attention[..., :2, :2], atol=1e-6)


def test_cli_writes_pngs(tiny_bundle, tmp_path):
    result = run_cli(
        "service.inspect",
        "--bundle",
        str(tiny_bundle),
        "--prompt",
        "The quick brown fox",
        "--layers",
        "1",
        "--heads",
        "0,2",
        "--out",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    for name in ("layer-01.png", "next-tokens.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "layer-00.png").exists()
    bad = run_cli("service.inspect", "--bundle", str(tiny_bundle), "--prompt", "x", "--layers", "7")
    assert bad.returncode == 2 and "--layers 7" in bad.stderr
