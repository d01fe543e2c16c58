"""Loaders on tiny checkpoints the tests write themselves: safetensors dirs and GGUF files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from export.checkpoints import build_model, load_gguf, load_hf_dir
from export.model import KVCache, prefill
from tests.helpers import train_bpe_tokenizer, write_gguf_from_hf, write_gguf_gpt2_from_hf, write_hf_checkpoint

IDS = [5, 17, 42, 99, 3, 250, 7, 11]


def ours_logits(model, ids=IDS) -> torch.Tensor:
    return prefill(model, KVCache(model.config, 1, len(ids)), [ids])[0]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    hf = write_hf_checkpoint(directory, "llama")
    return directory, hf


def test_hf_dir_records_config_and_tokenizer(llama_dir):
    directory, hf = llama_dir
    ckpt = load_hf_dir(directory)
    assert ckpt.config.family == "llama" and ckpt.config.n_kv_head == 2 and not ckpt.config.tie_embeddings
    assert ckpt.tokenizer.eos_token_id == 2 and "<|im_start|>" in ckpt.tokenizer.chat_template
    assert json.loads(ckpt.tokenizer.tokenizer_json)["model"]["type"] == "BPE"


def test_gguf_loader_matches_transformers_reading_the_same_file(llama_dir, tmp_path):
    """The q/k row un-permutation is checked against transformers' own GGUF loader."""
    from transformers import AutoModelForCausalLM

    directory, hf = llama_dir
    path = tmp_path / "tiny.gguf"
    write_gguf_from_hf(path, hf, (directory / "tokenizer.json").read_text())
    ours = build_model(load_gguf(path))
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(ours_logits(ours), expected, atol=1e-4, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(expected, hf(torch.tensor([IDS])).logits[0], atol=1e-4, rtol=0)


def test_gguf_q4_1_blocks_are_kept_for_the_int4_graph(llama_dir, tmp_path):
    directory, hf = llama_dir
    path = tmp_path / "tiny-q4.gguf"
    write_gguf_from_hf(path, hf, (directory / "tokenizer.json").read_text(), quantize_linears=True)
    ckpt = load_gguf(path)
    assert len(ckpt.packed) == 2 * 7  # every linear of both blocks
    p = ckpt.packed["blocks.0.attn.q_proj.weight"]
    assert p.qtype == "Q4_1" and p.shape == (64, 64)
    # the packed rows and the dequantized weight describe the same matrix
    from export.quantize import _to_matmul_nbits

    q, scales, zp, rest = _to_matmul_nbits(p)  # (N, K/32, 32), (N, K/32) x 2, (N, K/32)
    assert zp.max() <= 15 and (zp > 0).any()  # most of each minimum becomes a zero point...
    assert (np.abs(rest) <= scales / 2).all()  # ...and the minimum term carries the rest
    w = (q.astype(np.float32) - zp[..., None]).reshape(64, -1) * np.repeat(scales, 32, 1) + np.repeat(rest, 32, 1)
    np.testing.assert_allclose(w, ckpt.weights["blocks.0.attn.q_proj.weight"].numpy(), atol=1e-6)


def test_gpt2_hf_dir_splits_fused_attention(tmp_path):
    hf = write_hf_checkpoint(tmp_path, "gpt2")
    ckpt = load_hf_dir(tmp_path)
    assert ckpt.config.family == "gpt2" and ckpt.config.tie_embeddings and ckpt.config.bias
    with torch.no_grad():
        expected = hf(torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(ours_logits(build_model(ckpt)), expected, atol=1e-4, rtol=0)


def test_tokenizer_from_trained_bpe_round_trips():
    tok = train_bpe_tokenizer()
    for text in ["Hello world", "日本語 🎉"]:
        assert tok.decode(tok.encode(text).ids) == text


def test_gpt2_gguf_matches_transformers_reading_the_same_file(tmp_path):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "hf"
    hf = write_hf_checkpoint(src, "gpt2")
    path = tmp_path / "tiny-gpt2.gguf"
    write_gguf_gpt2_from_hf(path, hf, (src / "tokenizer.json").read_text())
    ckpt = load_gguf(path)
    assert ckpt.config.family == "gpt2" and ckpt.config.tie_embeddings and ckpt.config.bias
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(torch.tensor([IDS])).logits[0]
        torch.testing.assert_close(expected, hf(torch.tensor([IDS])).logits[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours_logits(build_model(ckpt)), expected, atol=1e-4, rtol=0)
