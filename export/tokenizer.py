"""The bundle's tokenizer: a Hugging Face `tokenizers` JSON built from GGUF metadata or taken from a checkpoint dir."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from export.errors import ExportError

# GGUF token types (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4
# llama.cpp's end-of-generation tokens found by their text (llama-vocab.cpp), for GGUFs whose metadata names fewer
# (an older Llama 3 Instruct names <|end_of_text|> as eos and no eot, and would write past <|eot_id|>)
_END_OF_GENERATION = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
    "<EOT>", "_<EOT>", "<|end_of_text|>",
)  # fmt: skip

# Pre-tokenizer splits by `tokenizer.ggml.pre`, as llama.cpp applies them (llama-vocab.cpp).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS: dict[str, list[str]] = {
    "default": [_GPT2_SPLIT],
    "gpt-2": [_GPT2_SPLIT],
    "gpt2": [_GPT2_SPLIT],
    "smollm": [r"\p{N}", _GPT2_SPLIT],  # digits one by one, then GPT-2's split (SmolLM's own tokenizer.json)
    "llama-bpe": [_LLAMA3_SPLIT],
    "llama3": [_LLAMA3_SPLIT],
    "llama-v3": [_LLAMA3_SPLIT],
    "qwen2": [_LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")],  # Llama 3's split with single digits
}


@dataclass(frozen=True)
class TokenizerSpec:
    """What the bundle records about the tokenizer besides tokenizer.json itself."""

    tokenizer_json: str
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    chat_template: str | None
    add_bos_token: bool
    eos_token_ids: tuple[int, ...] = ()  # every id that ends generation, eos_token_id first

    def special_tokens(self) -> dict[str, Any]:
        return {
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "eos_token_ids": list(self.eos_token_ids),
            "pad_token_id": self.pad_token_id,
            "add_bos_token": self.add_bos_token,
        }


def _unique_ids(*groups: Any) -> tuple[int, ...]:
    """Ids from ints, lists of ints and Nones, first occurrence first."""
    out: list[int] = []
    for g in groups:
        for i in g if isinstance(g, (list, tuple)) else [g]:
            if i is not None and int(i) not in out:
                out.append(int(i))
    return tuple(out)


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def from_gguf_metadata(meta: dict[str, Any], gguf_path: str) -> TokenizerSpec:
    """Builds a byte-level BPE tokenizer from `tokenizer.ggml.*`; SentencePiece vocabularies go through transformers."""
    model = meta.get("tokenizer.ggml.model")
    if model == "gpt2":
        tokenizer = _byte_level_bpe(meta)
    elif model == "llama":
        tokenizer = _sentencepiece_via_transformers(gguf_path)
    else:
        raise ExportError(f"{gguf_path}: unsupported GGUF tokenizer model {model!r} (expected 'gpt2' or 'llama')")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if add_bos and bos is not None:
        bos_token = meta["tokenizer.ggml.tokens"][bos]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos)]
        )
    # llama.cpp ends generation at any end-of-generation token: eos, end-of-turn (<|eot_id|>), end-of-message, and
    # the tokens spelled as one of them (whatever their type: llama.cpp marks them control)
    named = [i for i, t in enumerate(meta["tokenizer.ggml.tokens"]) if t in _END_OF_GENERATION]
    stops = _unique_ids(*(meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")), named)
    return TokenizerSpec(
        tokenizer_json=tokenizer.to_str(),
        bos_token_id=bos,
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
        add_bos_token=add_bos,
        eos_token_ids=stops,
    )


def _byte_level_bpe(meta: dict[str, Any]) -> Tokenizer:
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    alphabet = set(_byte_level_alphabet().values())
    vocab = {t: i for i, t in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_SPLITS:
        raise ExportError(f"unsupported GGUF pre-tokenizer {pre!r} (known: {', '.join(sorted(_PRE_SPLITS))})")
    splits = [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in _PRE_SPLITS[pre]]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) match whole and are special; user-defined ones match whole too.
    specials = [
        AddedToken(t, special=True, normalized=False)
        for t, k in zip(tokens, types)
        if k == _CONTROL and set(t) <= alphabet
    ]
    users = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    tokenizer.add_special_tokens(specials)
    tokenizer.add_tokens(users)
    return tokenizer


def _sentencepiece_via_transformers(gguf_path: str) -> Tokenizer:
    """transformers' conversion of the GGUF's SentencePiece vocabulary, read from a directory holding the GGUF alone:
    given the GGUF's own directory, transformers prefers a tokenizer.json lying beside it (another model's)."""
    import tempfile

    from transformers import AutoTokenizer

    path = Path(gguf_path).resolve()
    with tempfile.TemporaryDirectory(prefix="gguf-tokenizer-") as alone:
        (Path(alone) / path.name).symlink_to(path)
        hf = AutoTokenizer.from_pretrained(alone, gguf_file=path.name)
    return hf.backend_tokenizer


def from_hf_dir(directory: Path, config: dict[str, Any]) -> TokenizerSpec:
    """tokenizer.json (or vocab.json + merges.txt) plus special ids and the chat template from the dir's configs."""
    tj = directory / "tokenizer.json"
    if tj.is_file():
        tokenizer = Tokenizer.from_file(str(tj))
    elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        bpe = models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt"))
        tokenizer = Tokenizer(bpe)
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
    else:
        raise ExportError(f"{directory}: no tokenizer.json (or vocab.json + merges.txt) in the checkpoint directory")
    tc_path = directory / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
    template = tc.get("chat_template")
    if isinstance(template, list):  # named templates ([{"name": "default", "template": ...}, {"name": "tool_use"...}])
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text()

    gc_path = directory / "generation_config.json"
    gc = json.loads(gc_path.read_text()) if gc_path.is_file() else {}

    def token_ids(name: str) -> tuple[int, ...]:
        """config.json's id (an int or, as in Llama 3 Instruct, a list), then the token named in tokenizer_config."""
        named = tc.get(f"{name}_token")
        named = named.get("content") if isinstance(named, dict) else named
        by_name = tokenizer.token_to_id(named) if isinstance(named, str) else None
        return _unique_ids(config.get(f"{name}_token_id"), by_name)

    eos = token_ids("eos")
    return TokenizerSpec(
        tokenizer_json=tokenizer.to_str(),
        bos_token_id=next(iter(token_ids("bos")), None),
        eos_token_id=next(iter(eos), None),
        pad_token_id=next(iter(token_ids("pad")), None),
        chat_template=template,
        add_bos_token=bool(tc.get("add_bos_token", False)),
        eos_token_ids=_unique_ids(eos, gc.get("eos_token_id")),  # generation_config's stop ids too
    )
