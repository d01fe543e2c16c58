"""Reads and validates a bundle's manifest: the only code in service/ that knows the bundle layout."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "gpt-onnx-bundle"
FORMAT_VERSION = 2  # 2: fused graph, logits only at `logits_index`, rotary from seqlens_k (1: one logit per position)


class BundleError(Exception):
    """The bundle cannot be served; the message names the file and what was expected."""


@dataclass(frozen=True)
class InspectGraph:
    """The optional inspection graph: input_ids (1, S) -> logits (1, S, V), attention (n_layer, n_head, S, S)."""

    file: Path
    max_tokens: int
    n_layer: int
    n_head: int


@dataclass(frozen=True)
class Bundle:
    path: Path
    name: str
    family: str
    vocab_size: int
    n_layer: int
    n_kv_head: int
    head_dim: int
    max_context: int
    cache_dtype: str  # "float32" | "float16"
    input_names: tuple[str, ...]  # the graph's inputs besides the cache (position_ids only for learned positions)
    dtype: str
    quantization: str
    bos_token_id: int | None
    eos_token_id: int | None
    eos_token_ids: tuple[int, ...]  # every id that ends generation (config list, generation_config, GGUF eot)
    chat_template: str | None
    golden_prompts: list[list[int]]
    golden_tokens: list[list[int]]
    golden_atol: float
    generation_defaults: dict[str, float]  # the model's recommended sampling (temperature, top_p, top_k)
    manifest: dict[str, Any]
    kernels: tuple[str, ...] = ()  # ops of the project's ortkernels/ library the graph runs (MatMulQ4_1)
    inspect: InspectGraph | None = None  # bundles exported before it existed, and quantized ones, have none

    @property
    def graph(self) -> Path:
        return self.path / self.manifest["graph"]["file"]

    @property
    def tokenizer_file(self) -> Path:
        return self.path / self.manifest["tokenizer"]["file"]

    def golden_logits(self) -> np.ndarray:
        return np.load(self.path / self.manifest["golden"]["file"])["last_logits"]  # (P, V)


def load_bundle(path: Path, verify_checksums: bool = True) -> Bundle:
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: missing (is {path} a bundle written by `python -m export`?)")
    try:
        m = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{manifest_path}: invalid JSON ({exc})") from exc
    if m.get("format") != FORMAT:
        raise BundleError(f"{manifest_path}: format is {m.get('format')!r}, expected {FORMAT!r}")
    if m.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path}: format_version is {m.get('format_version')!r}, expected {FORMAT_VERSION} "
            "(re-export the bundle with this version's `python -m export`)"
        )
    for name, meta in m.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise BundleError(f"{f}: listed in the manifest but missing")
        if f.stat().st_size != meta["bytes"]:
            raise BundleError(f"{f}: {f.stat().st_size} bytes, the manifest says {meta['bytes']}")
        if verify_checksums and _sha256(f) != meta["sha256"]:
            raise BundleError(f"{f}: sha256 differs from the manifest's {meta['sha256'][:12]}...")
    try:
        model, cache = m["model"], m["graph"]["cache"]
        if cache.get("attention_op") != "com.microsoft::GroupQueryAttention" or not cache.get(
            "past_present_share_buffer"
        ):
            raise BundleError(f"{manifest_path}: graph.cache must be a shared-buffer GroupQueryAttention cache")
        return Bundle(
            path=path,
            name=m["name"],
            family=model["family"],
            vocab_size=model["vocab_size"],
            n_layer=cache["n_layer"],
            n_kv_head=cache["kv_heads"],
            head_dim=cache["head_dim"],
            max_context=m["max_context"],
            cache_dtype=m["graph"]["inputs"]["past_key_values.0.key"]["dtype"],
            input_names=tuple(n for n in m["graph"]["inputs"] if not n.startswith("past_key_values.")),
            dtype=m["dtype"],
            quantization=m["quantization"],
            bos_token_id=m["tokenizer"].get("bos_token_id"),
            eos_token_id=m["tokenizer"].get("eos_token_id"),
            eos_token_ids=_stop_ids(m["tokenizer"]),
            chat_template=m["tokenizer"].get("chat_template"),
            golden_prompts=m["golden"]["prompts"],
            golden_tokens=m["golden"]["greedy_tokens"],
            golden_atol=m["golden"]["logits_atol"],
            generation_defaults=dict(m.get("generation_defaults") or {}),
            manifest=m,
            kernels=tuple(m["graph"].get("kernels", ())),
            inspect=_inspect_graph(path, m["inspect"]) if "inspect" in m else None,
        )
    except KeyError as exc:
        raise BundleError(f"{manifest_path}: missing field {exc}") from exc


def _stop_ids(tokenizer: dict[str, Any]) -> tuple[int, ...]:
    """`eos_token_ids` (every stop id); bundles written before it carry only `eos_token_id`."""
    ids = tokenizer.get("eos_token_ids")
    if ids is None:
        ids = [] if tokenizer.get("eos_token_id") is None else [tokenizer["eos_token_id"]]
    return tuple(int(i) for i in ids)


def _inspect_graph(path: Path, entry: dict[str, Any]) -> InspectGraph:
    n_layer, n_head, _, _ = entry["outputs"]["attention"]["shape"]
    if not (path / entry["file"]).is_file():
        raise BundleError(f"{path / entry['file']}: the manifest's inspection graph is missing")
    return InspectGraph(path / entry["file"], int(entry["max_tokens"]), int(n_layer), int(n_head))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
