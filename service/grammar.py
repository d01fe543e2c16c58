"""Structured output: JSON Schema / JSON object grammars compiled and matched by llguidance, one matcher a sequence.

Requests without a `response_format` never touch this module (no mask is computed for them). The token-level
tokenizer llguidance needs is built from the bundle's tokenizer.json on first use (about half a second), not at start.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import llguidance
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

# {"type": "json_object"}: any JSON object, as OpenAI's JSON mode promises
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
_OPTIONS: Any = {"whitespace_flexible": False}  # compact JSON: a model cannot wander into endless whitespace


class GrammarError(ValueError):
    """The schema cannot be compiled into a grammar; the message says why."""


class Grammars:
    """Compiles schemas to grammars (validated against the tokenizer) and makes a matcher per sequence."""

    def __init__(self, tokenizer_file: Path, eos_ids: tuple[int, ...], vocab_size: int) -> None:
        self._tokenizer_file, self._eos_ids, self.vocab_size = tokenizer_file, eos_ids, vocab_size
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.LLTokenizer(
                    self._tokenizer_file.read_text(), eos_token=list(self._eos_ids) or None
                )
            return self._tokenizer

    def compile(self, schema: dict[str, Any]) -> str:
        """A JSON Schema -> a grammar string for `matcher`; GrammarError if the schema is invalid or unsupported."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_OPTIONS)
        except Exception as exc:  # llguidance reports a bad schema as ValueError; anything else is the schema's too
            raise GrammarError(str(exc)) from exc
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise GrammarError(messages[0] if messages else "invalid schema")
        return grammar

    def matcher(self, grammar: str) -> GrammarConstraint:
        return GrammarConstraint(llguidance.LLMatcher(self.tokenizer, grammar), self.tokenizer.vocab_size)


class GrammarConstraint:
    """One sequence's position in its grammar: the allowed-token mask, and advancing by the sampled token."""

    def __init__(self, matcher: llguidance.LLMatcher, tokenizer_vocab: int) -> None:
        self._matcher = matcher
        self._bitmask = allocate_token_bitmask(1, tokenizer_vocab)  # (1, ceil(V/32)) int32

    def allowed(self, vocab_size: int) -> np.ndarray:
        """(V,) bool over the model's vocabulary (ids past the tokenizer's are never allowed)."""
        fill_next_token_bitmask(self._matcher, self._bitmask)
        bits = np.unpackbits(self._bitmask[0].view(np.uint8), bitorder="little").astype(bool)
        out = np.zeros(vocab_size, dtype=bool)
        n = min(vocab_size, bits.size)
        out[:n] = bits[:n]
        return out

    def advance(self, token: int) -> bool:
        if not self._matcher.consume_token(token):
            raise GrammarError(f"token {token} violates the grammar: {self._matcher.get_error()}")
        return self._matcher.is_stopped()
