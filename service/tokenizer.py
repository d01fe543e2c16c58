"""Encoding, chat templates, and incremental detokenization that is UTF-8-safe and holds back stop sequences."""

from __future__ import annotations

import codecs
import functools
import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

if TYPE_CHECKING:
    from service.bundle import Bundle


class TemplateError(ValueError):
    """The chat template could not render these messages."""


class TextTokenizer:
    def __init__(self, path: Path, chat_template: str | None, bos_token: str | None, eos_token: str | None) -> None:
        self._tok = Tokenizer.from_file(str(path))
        self._template = None
        if chat_template:
            self._template = template_environment().from_string(chat_template)
        self.bos_token, self.eos_token = bos_token, eos_token
        decoder = self._tok.decoder.__getstate__() if self._tok.decoder is not None else b""
        self._byte_level = b'"ByteLevel"' in decoder  # vocabulary strings spell bytes (GPT-2's byte alphabet)
        self._special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self._anchor = self._tok.token_to_id("a")  # a plain token to decode others after (token_bytes)
        self._anchor_text = self._tok.decode([self._anchor]) if self._anchor is not None else ""

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> TextTokenizer:
        """The bundle's tokenizer and chat template, with its bos/eos tokens named for the template."""
        tok = cls(bundle.tokenizer_file, bundle.chat_template, None, None)
        name = lambda i: None if i is None else tok._tok.id_to_token(i)  # noqa: E731
        tok.bos_token, tok.eos_token = name(bundle.bos_token_id), name(bundle.eos_token_id)
        return tok

    def encode(self, text: str) -> list[int]:
        """A completion prompt: the tokenizer's own special tokens (a BOS post-processor) are added."""
        return self._tok.encode(text).ids

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """The rendered chat template, encoded without adding special tokens: the template writes its own BOS
        (`{{ bos_token }}`), as transformers' `apply_chat_template(tokenize=True)` and vLLM encode it."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        return self._tok.encode(text, add_special_tokens=False).ids

    @property
    def backend(self) -> Tokenizer:
        return self._tok

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def prompt_text(self, ids: list[int]) -> str:
        """A prompt's text as echoed: a last character its ids leave unfinished is left to the completion that
        finishes it (the echo and the completion then read as the two decoded together)."""
        whole, own = self.unfinished(ids)
        return self.decode(ids[:whole]) + own

    def unfinished(self, ids: list[int]) -> tuple[int, str]:
        """Where the ids' text can be continued by an incremental decode: (the first of the last tokens it must
        hold back, the text of the whole characters those tokens hold). It holds back the tokens of an unfinished
        last character (token ids can end inside one), and any whose text ends in U+FFFD (tokenizers' DecodeStream
        takes that for an unfinished character); (len(ids), "") for a prompt that ends cleanly."""
        raw = [b"" if t in self._special else self.token_bytes(t) for t in ids]
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        utf8.decode(b"".join(raw))
        left = len(utf8.getstate()[0])  # bytes of a character not finished yet
        start, held = len(ids), 0
        while start and held < left:
            start -= 1
            held += len(raw[start])
        while start and self.decode(ids[:start]).endswith("\ufffd"):
            start -= 1
        own = b"".join(raw[start:])
        return start, own[: len(own) - left].decode("utf-8", "replace")

    @functools.lru_cache(maxsize=65536)  # noqa: B019 (one tokenizer per process, alive as long as it)
    def token_bytes(self, token_id: int) -> bytes:
        """One token's own bytes (logprobs' `bytes`): a token holding part of a character has the character's
        bytes it holds, not the replacement character a decode of it alone shows; a SentencePiece word's leading
        space is kept (a decode of it alone strips it)."""
        text = self._tok.decode([token_id], skip_special_tokens=False)
        if not self._byte_level and self._anchor is not None and token_id not in self._special:
            after = self._tok.decode([self._anchor, token_id])
            text = after.removeprefix(self._anchor_text) if after.startswith(self._anchor_text) else text
        if "\ufffd" not in text:
            return text.encode("utf-8")
        piece = self._tok.id_to_token(token_id) or ""
        if self._byte_level and all(c in _BYTE_OF_CHAR for c in piece):
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        if m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):  # SentencePiece's byte fallback
            return bytes([int(m[1], 16)])
        return text.encode("utf-8")

    @functools.lru_cache(maxsize=65536)  # noqa: B019
    def token_text(self, token_id: int) -> str:
        """The text of one token for logprobs. A token that is not whole UTF-8 (part of a character) reads
        `bytes:` and its bytes, as OpenAI's API writes it (`bytes: \\xf0\\x9f`), so two such tokens stay apart."""
        raw = self.token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in raw)

    def shows(self, token_id: int) -> bool:
        """Whether a decode shows the token: special tokens (BOS, EOS, the chat markers) are skipped."""
        return token_id not in self._special

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            # No template in the bundle: a plain transcript, ending where the assistant speaks.
            transcript = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return transcript + ("assistant:" if add_generation_prompt else "")
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except Exception as exc:  # jinja2 errors, raise_exception() from the template
            raise TemplateError(f"chat template failed: {exc}") from exc


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that stands for each byte in a vocabulary."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF_CHAR = _byte_alphabet()


def template_environment() -> ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in: loop controls, a `tojson` that does not
    HTML-escape, `strftime_now`, `raise_exception`."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    return env


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _raise(message: str) -> None:
    raise TemplateError(message)


@dataclass
class DetokenizedDelta:
    text: str  # safe to send now
    stopped: bool  # a stop sequence matched: the sequence ends, `text` is the last piece


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    - A character split across tokens (a decode ending in U+FFFD) is held until it is complete.
    - Text that could still become a stop sequence is held back; once a stop sequence matches, everything from it on
      is dropped and `stopped` is set.
    """

    def __init__(self, tokenizer: TextTokenizer, stop: list[str], prompt_tail: list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = list(prompt_tail or [])  # a little prompt context so the first token decodes right
        # tokenizers' incremental decoder, started on the context's whole characters: a prompt that ends inside a
        # character (token ids can) leaves its first bytes pending, and the token completing it sends the character
        # but not the prompt's own characters its pending tokens also hold (`_held_by_prompt`)
        whole, self._held_by_prompt = tokenizer.unfinished(self.ids)
        self._stream = DecodeStream(ids=self.ids[:whole], skip_special_tokens=True)
        for t in self.ids[whole:]:
            self._stream.step(tokenizer.backend, t)  # the pending bytes: nothing to send yet
        self.prefix_offset = self.read_offset = whole
        self.text = ""  # all decoded completion text so far
        self.emitted = 0  # characters of `text` already sent

    def add(self, token_id: int) -> DetokenizedDelta:
        self.ids.append(token_id)
        piece = self._stream.step(self.tokenizer.backend, token_id)  # None while a character is incomplete
        if piece is not None:
            if self._held_by_prompt:
                piece, self._held_by_prompt = piece.removeprefix(self._held_by_prompt), ""
            self.text += piece
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release()

    def flush(self) -> str:
        """At the end of the sequence: whatever is still held (a stop-sequence prefix that never completed, a
        character whose bytes never completed: it ends as U+FFFD, as a whole decode would show it)."""
        tail = self.tokenizer.decode(self.ids[self.prefix_offset :])
        head = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        if len(tail) > len(head):
            self.text += tail[len(head) :].removeprefix(self._held_by_prompt)
            self.prefix_offset = self.read_offset = len(self.ids)
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out

    def _release(self) -> DetokenizedDelta:
        if self.stop:
            start = max(0, self.emitted - max(map(len, self.stop)) + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                out = self.text[self.emitted : end]
                self.text = self.text[:end]
                self.emitted = end
                return DetokenizedDelta(out, True)
        safe = len(self.text) - self._held_back()
        out = self.text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return DetokenizedDelta(out, False)

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop sequence."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
