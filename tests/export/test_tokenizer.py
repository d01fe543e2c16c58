"""The tokenizer built from GGUF metadata encodes and decodes exactly like transformers' GGUF conversion."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from export.checkpoints import default_gguf_path, gguf_metadata, read_gguf
from export.tokenizer import from_gguf_metadata
from tests.helpers import CORPUS

EXTRA = [
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
    "Ünïcödé façade, Straße, Œuvre, ñandú, Ελληνικά, русский текст, العربية, עברית, हिन्दी",
    "한국어 텍스트, ภาษาไทย, 繁體中文字, カタカナ",
    "🙂🙃😀😃😄😁😆😅😂🤣👨‍👩‍👧‍👦 🏳️‍🌈",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}\n",
    "import numpy as np\nx = np.arange(10_000).reshape(100, 100)\n",
    "          ten spaces, then\n\n\n\nfour newlines\r\nand CRLF",
    "",
    " ",
    "1234567890 3.14159 1e-10 0x1F",
]


@pytest.fixture(scope="module")
def tokenizers_pair():
    from transformers import AutoTokenizer

    path = default_gguf_path()
    spec = from_gguf_metadata(gguf_metadata(read_gguf(path)), str(path))
    ours = Tokenizer.from_str(spec.tokenizer_json)
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return ours, theirs, spec


@pytest.mark.parametrize("text", CORPUS + EXTRA)
def test_encode_and_decode_match_transformers(tokenizers_pair, text):
    ours, theirs, _ = tokenizers_pair
    ids = ours.encode(text).ids
    assert ids == theirs(text, add_special_tokens=True)["input_ids"]
    assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)
    assert ours.decode(ids, skip_special_tokens=False) == text


def test_special_tokens_and_chat_template(tokenizers_pair):
    ours, _, spec = tokenizers_pair
    assert (spec.bos_token_id, spec.eos_token_id) == (1, 2)
    assert ours.id_to_token(spec.eos_token_id) == "<|im_end|>"
    assert "<|im_start|>" in spec.chat_template
    assert ours.encode("<|im_start|>").ids == [1]


def test_gguf_stop_ids_include_end_of_turn_and_end_of_message():
    """llama.cpp stops at every end-of-generation token; a Llama 3 GGUF names <|eot_id|> as eot, not eos."""
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["a", "b", "<|eot|>", "<|eom|>", "<|end|>"],
        "tokenizer.ggml.token_type": [1, 1, 3, 3, 3],
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.eos_token_id": 4,
        "tokenizer.ggml.eot_token_id": 2,
        "tokenizer.ggml.eom_token_id": 3,
    }
    spec = from_gguf_metadata(meta, "model.gguf")
    assert spec.eos_token_id == 4 and spec.eos_token_ids == (4, 2, 3)


def test_gguf_stop_ids_include_the_tokens_spelled_as_llama_cpps_end_of_generation():
    """An older Llama 3 Instruct GGUF names <|end_of_text|> as eos and no eot: llama.cpp still stops at <|eot_id|>
    (found by its text, whatever its type), and so does the bundle."""
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["a", "b", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>", "<|start_header_id|>"],
        "tokenizer.ggml.token_type": [1, 1, 3, 3, 1, 3],
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.eos_token_id": 2,
    }
    assert from_gguf_metadata(meta, "model.gguf").eos_token_ids == (2, 3, 4)


def test_a_sentencepiece_gguf_is_read_apart_from_files_beside_it(tmp_path, monkeypatch):
    """transformers, given the GGUF's directory, would read a tokenizer.json lying there instead of the GGUF's own
    vocabulary: the directory it is given holds the GGUF alone."""
    import transformers

    from export import tokenizer as export_tokenizer

    gguf = tmp_path / "llama-2.gguf"
    gguf.write_bytes(b"GGUF")
    (tmp_path / "tokenizer.json").write_text("{}")  # another model's
    seen = {}

    class Fake:
        backend_tokenizer = "converted"

    def from_pretrained(directory, gguf_file):
        seen["files"] = sorted(p.name for p in Path(directory).iterdir())
        seen["bytes"] = (Path(directory) / gguf_file).read_bytes()
        return Fake()

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    assert export_tokenizer._sentencepiece_via_transformers(str(gguf)) == "converted"
    assert seen == {"files": ["llama-2.gguf"], "bytes": b"GGUF"}
