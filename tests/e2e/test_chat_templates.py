"""Chat prompts are encoded as transformers encodes them, and every end-of-turn id ends the answer.

Two layouts a user brings: Llama 3 (the template writes `{{ bos_token }}` itself while the tokenizer also has a BOS
post-processor; `eos_token_id` is a list whose *last* entry is `<|eot_id|>`) and ChatML as Qwen2 writes it (no BOS;
`<|im_end|>` is a stop id only in `generation_config.json`). Each checkpoint's weights are set so that greedy decoding
emits the end-of-turn token first, whatever the prompt: the answer must end at once with finish_reason "stop".
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from tokenizers import Tokenizer, processors

from service.bundle import load_bundle
from service.tokenizer import TextTokenizer
from tests.e2e.conftest import start_server, stop_server
from tests.helpers import (
    CHAT_TEMPLATE,
    LLAMA3_CHAT_TEMPLATE,
    LLAMA3_SPECIALS,
    run_cli,
    train_bpe_tokenizer,
    write_hf_checkpoint,
)

pytestmark = pytest.mark.e2e

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello world! The quick brown fox?"},
    {"role": "assistant", "content": "café naïve"},
    {"role": "user", "content": "def add(a, b):"},
]


def always_emit(model: torch.nn.Module, token_id: int) -> None:
    """Residual dimension 0 holds a constant that nothing overwrites; only `token_id` reads it strongly."""
    with torch.no_grad():
        emb = model.model.embed_tokens.weight  # (V, C)
        emb[:, 0] = 10.0
        emb[token_id, 0] = 100.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        model.model.norm.weight[0] = 1.0
        if model.lm_head.weight is not emb:  # untied: the same reading in the unembedding
            model.lm_head.weight[:, 0] = 10.0
            model.lm_head.weight[token_id, 0] = 100.0


CASES = {
    # name: (family, template, extra specials, eos in config.json, generation_config eos, end-of-turn token)
    "llama3": ("llama3", LLAMA3_CHAT_TEMPLATE, LLAMA3_SPECIALS, [4, 2, 7], None, "<|eot_id|>"),
    "chatml": ("qwen2", CHAT_TEMPLATE, (), 0, {"eos_token_id": [2, 0]}, "<|im_end|>"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def chat_bundle(request, tmp_path_factory) -> tuple[str, Path, Path]:
    family, template, specials, eos, generation, end_of_turn = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    tok = train_bpe_tokenizer(extra_specials=specials)
    bos = "<|begin_of_text|>" if request.param == "llama3" else None
    if bos:  # Llama 3's tokenizer.json adds BOS to every encoding
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 3)])
    tokenizer_config = {"chat_template": template, "eos_token": end_of_turn, **({"bos_token": bos} if bos else {})}
    src = tmp / "hf"
    model = write_hf_checkpoint(
        src,
        family,
        tokenizer_json=tok.to_str(),
        tokenizer_config=tokenizer_config,
        generation_config=generation,
        eos_token_id=eos,
    )
    always_emit(model, tok.token_to_id(end_of_turn))
    model.save_pretrained(src, safe_serialization=True)
    if generation is not None:  # save_pretrained rewrote it from the model config
        (src / "generation_config.json").write_text(json.dumps(generation))
    out = tmp / "bundle"
    result = run_cli("export", "--source", str(src), "--out", str(out), "--max-context", "256")
    assert result.returncode == 0, result.stderr
    return request.param, src, out


def transformers_chat_ids(src: Path) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    out = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if not isinstance(out, list) else out)


def test_manifest_records_every_stop_id(chat_bundle):
    name, _, bundle = chat_bundle
    stops = json.loads((bundle / "manifest.json").read_text())["tokenizer"]["eos_token_ids"]
    assert stops == ([4, 2, 7] if name == "llama3" else [0, 2])


def test_prompt_ids_equal_transformers_apply_chat_template(chat_bundle):
    name, src, bundle = chat_bundle
    ours = TextTokenizer.from_bundle(load_bundle(bundle)).encode_chat(MESSAGES)
    assert ours == transformers_chat_ids(src)
    if name == "llama3":
        assert ours[0] == 3 and ours[1] != 3  # one BOS: the template's, not the post-processor's too


def test_served_chat_stops_at_the_end_of_turn_token(chat_bundle, tmp_path):
    name, src, bundle = chat_bundle
    from transformers import AutoModelForCausalLM

    expected_ids = transformers_chat_ids(src)
    hf = AutoModelForCausalLM.from_pretrained(str(src))
    with torch.no_grad():
        first = int(hf(torch.tensor([expected_ids])).logits[0, -1].argmax())
    end_of_turn = CASES[name][5]
    assert first == Tokenizer.from_file(str(bundle / "tokenizer.json")).token_to_id(end_of_turn)  # as set up

    server = start_server(bundle, tmp_path / "server.log", "--served-model-name", "m")
    try:
        body = {"model": "m", "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["usage"]["prompt_tokens"] == len(expected_ids)
        assert out["choices"][0]["finish_reason"] == "stop", out
        assert out["choices"][0]["message"]["content"] == ""
        # The same request told to ignore stop ids runs to its length: the stop above was the end-of-turn token.
        r = httpx.post(server.url + "/v1/chat/completions", json={**body, "ignore_eos": True}, timeout=60)
        assert r.json()["choices"][0]["finish_reason"] == "length"
        assert r.json()["usage"]["completion_tokens"] == 8
    finally:
        stop_server(server)
