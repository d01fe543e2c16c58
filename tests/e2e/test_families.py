"""Every model family, from every source format, exported and served for real, answers like transformers.

One case per (family variant, source format): a tiny random checkpoint the test writes (a Hugging Face directory via
`save_pretrained`, or a GGUF laid out as llama.cpp writes one) -> `python -m export` as a subprocess ->
`python -m service` as a real server -> greedy `/v1/completions` over HTTP, equal to transformers' own `generate()`
token for token, one prompt of them sent while another request is running.
"""

from __future__ import annotations

import collections
import json
import threading
from pathlib import Path

import httpx
import onnx
import pytest
import torch
from tokenizers import Tokenizer

from tests.e2e.conftest import start_server, stop_server
from tests.helpers import run_cli, write_gguf_from_hf, write_gguf_gpt2_from_hf, write_hf_checkpoint

pytestmark = pytest.mark.e2e

CASES = [  # (family variant of tests.helpers.FAMILIES, source format)
    ("gpt2", "hf"),
    ("gpt2-untied", "hf"),
    ("gpt2", "gguf"),
    ("llama", "hf"),
    ("llama", "gguf"),
    ("llama3", "hf"),
    ("qwen2", "hf"),
    ("qwen2", "gguf"),
    ("mistral", "hf"),
    ("mistral", "gguf"),  # llama.cpp writes Mistral checkpoints with the llama architecture
]
PROMPTS = ["Hello world! The quick", "def add(a, b):\n", "café naïve résumé"]
MAX_TOKENS = 12


def write_source(tmp: Path, family: str, source: str) -> tuple[Path, torch.nn.Module, str]:
    """The checkpoint a user would bring; returns (path, the transformers model, tokenizer.json)."""
    hf_dir = tmp / "hf"
    model = write_hf_checkpoint(hf_dir, family)
    tokenizer_json = (hf_dir / "tokenizer.json").read_text()
    if source == "hf":
        return hf_dir, model, tokenizer_json
    path = tmp / f"{family}.gguf"
    if family.startswith("gpt2"):
        write_gguf_gpt2_from_hf(path, model, tokenizer_json)
    else:
        write_gguf_from_hf(path, model, tokenizer_json)
    return path, model, tokenizer_json


def reference(model: torch.nn.Module, tokenizer: Tokenizer, prompt: str, stops: list[int]) -> tuple[str, int]:
    """transformers' greedy generate() ending at the bundle's stop ids (a GGUF's add llama.cpp's end-of-generation
    tokens to the checkpoint's eos): the completion's text and its number of tokens."""
    ids = tokenizer.encode(prompt).ids
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=stops,
        )
    new = out[0, len(ids) :].tolist()
    if new and new[-1] in stops:  # the stop token ends the text; it is not part of it
        return tokenizer.decode(new[:-1], skip_special_tokens=True), len(new)
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


# Nodes a graph may have outside its decoder layers: the embedding (GPT-2: two Gathers and an Add), the final norm,
# the Reshape and Gather of the logits' positions, the unembedding (docs/EXPORT.md census).
OUTSIDE_LAYERS = 8
# What a TorchScript trace leaves between the fused ops (docs/EXPORT.md: format 1's ~131 nodes a layer)
TRACE_OPS = {"Cast", "Shape", "Constant", "ConstantOfShape", "Unsqueeze", "Squeeze", "Concat", "Slice", "Pow", "Sqrt"}


def assert_fused(bundle: Path, n_layer: int) -> None:
    """The fp32 graph has at most 12 nodes a decoder layer and no Cast/Shape/Constant chains (issue 10's census)."""
    nodes = onnx.load(bundle / "model.onnx", load_external_data=False).graph.node
    ops = collections.Counter(n.op_type for n in nodes)
    assert len(nodes) <= 12 * n_layer + OUTSIDE_LAYERS, f"{len(nodes)} nodes for {n_layer} layers: {ops}"
    assert not TRACE_OPS & set(ops), f"trace nodes left in the graph: {ops}"
    assert ops["CausalAttention"] + ops["GroupQueryAttention"] == n_layer, ops


def complete(url: str, prompt: str, max_tokens: int = MAX_TOKENS, **extra) -> dict:
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize(("family", "source"), CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_family_exports_serves_and_answers_like_transformers(family, source, tmp_path):
    path, model, tokenizer_json = write_source(tmp_path, family, source)
    bundle = tmp_path / "bundle"
    result = run_cli("export", "--source", str(path), "--out", str(bundle), "--max-context", "1024")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    arch = {"gpt2-untied": "gpt2", "llama3": "llama", "mistral": "llama" if source == "gguf" else "mistral"}
    assert manifest["model"]["arch"] == arch.get(family, family)
    parity = manifest["parity"][0]
    assert parity["verified"] and parity["max_abs_diff"] <= 1e-3 and parity["top1_agreement"] == 1.0
    assert_fused(bundle, manifest["model"]["n_layer"])

    tokenizer = Tokenizer.from_str(tokenizer_json)
    stops = manifest["tokenizer"]["eos_token_ids"]
    eos = model.generation_config.eos_token_id
    assert set(eos if isinstance(eos, list) else [eos]) <= set(stops)
    expected = {p: reference(model, tokenizer, p, stops) for p in PROMPTS}
    server = start_server(bundle, tmp_path / "server.log", "--max-num-seqs", "4", "--served-model-name", "m")
    try:
        for prompt in PROMPTS[:2]:
            out = complete(server.url, prompt)
            got = (out["choices"][0]["text"], out["usage"]["completion_tokens"])
            assert got == expected[prompt], f"{prompt!r}: served {got}, transformers {expected[prompt]}"

        # The last prompt goes in while another request is decoding (its first streamed token has arrived).
        started, results = threading.Event(), {}

        def background() -> None:
            body = {"model": "m", "prompt": PROMPTS[0], "max_tokens": 1000, "stream": True, "ignore_eos": True}
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        started.set()
                        results["last"] = json.loads(line[6:])
            started.set()

        thread = threading.Thread(target=background)
        thread.start()
        assert started.wait(120)
        out = complete(server.url, PROMPTS[2])
        assert thread.is_alive()  # 12 tokens finish long before the other request's 1000: they ran together
        thread.join(120)
        got = (out["choices"][0]["text"], out["usage"]["completion_tokens"])
        assert got == expected[PROMPTS[2]], f"{PROMPTS[2]!r} beside another stream: served {got}"
        assert results["last"]["choices"][0]["finish_reason"] == "length"  # the other request ran to its end
    finally:
        stop_server(server)
