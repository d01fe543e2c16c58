"""Every bundle type the exporter makes, served by `python -m service` and held to its documented bound.

One tiny Llama GGUF with Q4_1 blocks (tests/e2e/conftest.py `q4_gguf`) is exported as fp32, fp16, int8, int4 from
the file's own blocks and int4 re-quantized; each bundle is served as a user would serve it. The server checks the
bundle's golden outputs at start; greedy answers are compared with the torch model read from the same file:
teacher-forced top-1 agreement and log-probabilities within the variant's bound in export/parity.py `BOUNDS`, and
free-running greedy text equal to the bundle's golden tokens (which the exporter made with plain `session.run`),
three requests at once so the batched decode over the cache (float16 for the fp16 bundle) is what answers.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from tokenizers import Tokenizer

import ortkernels
from export.parity import BOUNDS
from service.tokenizer import TextTokenizer
from tests.e2e.conftest import BUNDLE_TYPES, start_server, stop_server

pytestmark = pytest.mark.e2e

PROMPTS = ["The quick brown fox jumps over", "def add(a, b):\n    return", "price: $1,234.56 in 2024;"]
STEPS = 16


@pytest.fixture(scope="module")
def reference(q4_gguf, q4_bundles):
    """Per prompt: (prompt ids + torch greedy continuation, torch log-softmax at every position of it)."""
    import torch

    from export.checkpoints import build_model, load
    from export.parity import torch_reference

    model = build_model(load(str(q4_gguf)))
    tok = Tokenizer.from_file(str(q4_bundles("fp32") / "tokenizer.json"))
    out = []
    for text in PROMPTS:
        ids = tok.encode(text).ids
        with torch.no_grad():
            run = torch_reference(model, [ids], STEPS)
        logits = np.concatenate([run.prefill_logits[0], run.decode_logits[:, 0]])  # (len(ids) + STEPS, V)
        logits = logits.astype(np.float64) - logits.max(-1, keepdims=True)
        logsoftmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        out.append((ids, [int(t) for t in run.tokens[0, :STEPS]], logsoftmax))
    return out


@pytest.mark.parametrize("variant", list(BUNDLE_TYPES))
def test_each_bundle_type_serves_within_its_bound(variant, q4_bundles, reference, tmp_path):
    bundle = q4_bundles(variant)
    manifest = json.loads((bundle / "manifest.json").read_text())
    report = manifest["parity"][-1]
    # the same blocks in onnxruntime's op, the same graph on onnxruntime's ops alone: the same bound
    parity_variant = variant.removesuffix("-matmulnbits").removesuffix("-onnxruntime")
    assert report["variant"] == parity_variant and report["verified"] is True
    # the project's ops (ortkernels/, where built) in every CPU graph but those exported without them
    kernels = {"fp16": [], "fp32-onnxruntime": [], "int4-gguf": ["CausalAttention", "MatMulQ4_1"]}
    expected = kernels.get(variant, ["CausalAttention", "SwiGLU"]) if ortkernels.available() else []
    assert manifest["graph"]["kernels"] == expected
    server = start_server(bundle, tmp_path / "server.log", "--max-model-len", "1024", "--max-num-seqs", "4")
    try:
        assert "golden outputs reproduce" in server.log.read_text()  # checked at start, before serving
        model = httpx.get(server.v1 + "/models").json()["data"][0]
        assert model["id"] == "tiny-q4" and model["dtype"] == manifest["dtype"]
        assert model["quantization"] == manifest["quantization"]
        cache_dtype = manifest["graph"]["inputs"]["past_key_values.0.key"]["dtype"]
        assert cache_dtype == ("float16" if variant == "fp16" else "float32")

        bound = BOUNDS[parity_variant]
        with httpx.Client(base_url=server.v1, timeout=120) as h:
            agree = total = 0
            worst = 0.0
            for prompt, greedy, logsoftmax in reference:
                seq = prompt + greedy
                body = {"model": "tiny-q4", "prompt": seq, "max_tokens": 1, "echo": True, "logprobs": 1}
                lp = h.post("/completions", json={**body, "temperature": 0}).json()["choices"][0]["logprobs"]
                for j in range(1, len(seq)):  # entry j: log p(seq[j] | seq[:j]), torch's row j - 1
                    worst = max(worst, abs(lp["token_logprobs"][j] - logsoftmax[j - 1, seq[j]]))
                for j in range(len(prompt), len(seq)):  # seq[j] is torch's argmax there: is it the served one?
                    total += 1
                    agree += lp["token_logprobs"][j] == max(lp["top_logprobs"][j].values())
            assert agree / total >= bound.min_top1, (agree, total)
            if bound.max_abs_diff is not None:  # a log-softmax moves at most twice the largest logit change
                assert worst <= 2 * bound.max_abs_diff, worst
            if parity_variant == "fp32":
                assert agree == total

            golden = list(zip(manifest["golden"]["prompts"], manifest["golden"]["greedy_tokens"]))

            def ask(prompt: list[int]) -> list[str]:
                body = {"model": "tiny-q4", "prompt": prompt, "max_tokens": STEPS, "temperature": 0, "logprobs": 0}
                r = h.post("/completions", json=body)
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["logprobs"]["tokens"]  # one text per generated token

            # int8 is dynamic quantization: one activation scale per tensor over the whole batch, so its tokens
            # depend on the other rows (docs/EXPORT.md); its requests go one at a time.
            with ThreadPoolExecutor(1 if variant == "int8" else len(golden)) as pool:
                served = list(pool.map(ask, [p for p, _ in golden]))
            stops = set(manifest["tokenizer"]["eos_token_ids"])
            text = TextTokenizer(bundle / "tokenizer.json", None, None, None).token_text  # "bytes:..." for part of one
            for pieces, (_, tokens) in zip(served, golden):
                end = next((i for i, t in enumerate(tokens) if t in stops), len(tokens) - 1)
                assert pieces == [text(t) for t in tokens[: end + 1]]
    finally:
        stop_server(server)
