"""Request -> (prompt ids, sampling parameters): every limit, default and context-length rule, in one place.

After `Validator.completion` or `Validator.chat` returns, nothing downstream re-checks: the scheduler asserts.
Errors are `APIError`s in OpenAI's shape, naming the offending parameter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from service.config import Settings
from service.errors import bad_request, model_not_found, unsupported
from service.grammar import JSON_OBJECT_SCHEMA, GrammarError, Grammars
from service.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, ResponseFormat, _Sampling
from service.sampler import SamplingParams
from service.tokenizer import TemplateError, TextTokenizer

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
LOGIT_BIAS_RANGE = 100.0  # OpenAI: each bias is in [-100, 100]
_GRAMMAR_CACHE = 64  # compiled schemas kept (most requests of a client repeat one schema)


@dataclass(frozen=True)
class ValidRequest:
    """What the engine client submits: one or more prompts, each sampled n times with the same parameters."""

    prompts: tuple[tuple[int, ...], ...]
    params: SamplingParams
    n: int
    prompt_logprobs: bool = False  # echo with logprobs


class Validator:
    def __init__(
        self,
        settings: Settings,
        tokenizer: TextTokenizer,
        model_name: str,
        max_model_len: int,
        generation_defaults: dict[str, float],
        grammars: Grammars | None,
    ) -> None:
        self.settings, self.tokenizer, self.model_name = settings, tokenizer, model_name
        self.max_model_len, self.defaults, self.grammars = max_model_len, generation_defaults, grammars
        self._compiled: dict[str, str] = {}

    # ------------------------------------------------------------------ the two requests

    def completion(self, req: CompletionRequest) -> ValidRequest:
        self._common(req, req.max_tokens)
        if req.logprobs is not None and req.logprobs > self.settings.max_logprobs:
            raise bad_request(f"logprobs must be at most {self.settings.max_logprobs}", "logprobs")
        if req.suffix is not None:
            raise unsupported("suffix", "insertion (fill-in-the-middle) is not implemented")
        if req.best_of is not None and req.best_of != req.n:
            raise unsupported("best_of", "server-side best-of sampling is not implemented; use n")
        prompts = self._prompts(req.prompt)
        # more sequences or prompt tokens than an idle server's queue holds: a 400, not a 429 to retry forever
        room = self.settings.max_waiting_requests + self.settings.max_num_seqs  # the free slots admit at once
        if len(prompts) * req.n > room:
            raise bad_request(
                f"{len(prompts)} prompts x n={req.n} is more than the {room} sequences one request may queue "
                "(max_waiting_requests + max_num_seqs)",
                "prompt",
            )
        if sum(map(len, prompts)) * req.n > self.settings.max_queued_prompt_tokens:
            raise bad_request(
                f"the prompts' tokens x n are more than the {self.settings.max_queued_prompt_tokens} prompt tokens "
                "one request may queue (max_queued_prompt_tokens)",
                "prompt",
            )
        longest = max(len(p) for p in prompts)
        default = COMPLETIONS_DEFAULT_MAX_TOKENS
        max_tokens = self.get_max_tokens(longest, req.max_tokens, default, "prompt", "max_tokens")
        params = self._params(req, max_tokens, req.logprobs)
        prompt_logprobs = req.echo and req.logprobs is not None
        return ValidRequest(tuple(tuple(p) for p in prompts), params, req.n, prompt_logprobs)

    def chat(self, req: ChatCompletionRequest) -> ValidRequest:
        if len(req.messages) > self.settings.max_messages:
            raise bad_request(f"at most {self.settings.max_messages} messages", "messages")
        if req.tools or req.functions:
            raise unsupported("tools" if req.tools else "functions", "tool calling is not implemented")
        if req.tool_choice not in (None, "none") or req.function_call not in (None, "none"):
            raise unsupported("tool_choice" if req.tool_choice else "function_call", "tool calling is not implemented")
        if any(m.tool_calls or m.function_call for m in req.messages):
            raise unsupported("messages", "messages with tool_calls (tool calling is not implemented)")
        if any(m.audio for m in req.messages):
            raise unsupported("messages", "messages with audio (audio is not implemented)")
        self._no_effect_fields(req)
        requested, param = (
            (req.max_completion_tokens, "max_completion_tokens")
            if req.max_completion_tokens is not None
            else (req.max_tokens, "max_tokens")
        )
        self._common(req, requested, param)
        if req.top_logprobs is not None and not req.logprobs:  # as OpenAI's API and vLLM answer it
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        top = (req.top_logprobs or 0) if req.logprobs else None
        if top is not None and top > self.settings.max_logprobs:
            raise bad_request(f"top_logprobs must be at most {self.settings.max_logprobs}", "top_logprobs")
        prompt = self.chat_prompt(req.messages)
        max_tokens = self.get_max_tokens(len(prompt), requested, self.settings.default_max_tokens, "messages", param)
        return ValidRequest((tuple(prompt),), self._params(req, max_tokens, top), req.n)

    # ------------------------------------------------------------------ the rules

    @staticmethod
    def _no_effect_fields(req: ChatCompletionRequest) -> None:
        """OpenAI's chat fields that would change nothing here are accepted (metadata, prediction: a speed hint,
        prompt_cache_key: the prefix cache needs none, safety_identifier); those asking for what this server does
        not do are refused, never ignored."""
        if req.store:
            raise unsupported("store", "completions are not stored")
        if req.service_tier not in (None, "auto", "default"):
            raise unsupported("service_tier", "there is one service tier (auto, default)")
        if req.modalities is not None and set(req.modalities) != {"text"}:
            if "audio" in req.modalities:
                raise unsupported("modalities", "audio output is not implemented")
            raise bad_request("modalities must include text", "modalities")
        refused = {
            "audio": "audio output is not implemented",
            "reasoning_effort": "the model does not reason before it answers",
            "verbosity": "output verbosity is not implemented; use max_tokens",
            "web_search_options": "web search is not implemented",
        }
        for field, why in refused.items():
            if getattr(req, field) is not None:
                raise unsupported(field, why)

    def get_max_tokens(
        self, prompt_len: int, requested: int | None, default: int, prompt_param: str, tokens_param: str
    ) -> int:
        """The one place max_tokens is decided. Asked for: it must fit beside the prompt (400 otherwise). Left out:
        the endpoint's default, shortened to the room the prompt leaves."""
        limit = self.settings.max_prompt_tokens
        if limit and prompt_len > limit:
            raise bad_request(
                f"the prompt has {prompt_len} tokens; at most {limit} are accepted", prompt_param, "prompt_too_long"
            )
        room = self.max_model_len - prompt_len
        if room < 1 or (requested is not None and requested > room):
            asked = prompt_len + (requested or 0)
            detail = f" ({prompt_len} in the prompt, {requested} in the completion)" if requested else ""
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{asked} tokens{detail}. Please reduce the length of the prompt or completion.",
                prompt_param if requested is None or room < 1 else tokens_param,
                "context_length_exceeded",
            )
        return requested if requested is not None else min(default, room)

    def _common(self, req: _Sampling, requested: int | None, param: str = "max_tokens") -> None:
        if req.model != self.model_name:
            raise model_not_found(req.model)
        if requested is not None and requested > self.settings.max_tokens_limit:
            raise bad_request(
                f"{param} must be at most {self.settings.max_tokens_limit}", param, "max_tokens_too_large"
            )
        if req.n > self.settings.max_n:
            raise bad_request(f"n must be at most {self.settings.max_n}", "n")
        stops = req.stop_list
        if len(stops) > self.settings.max_stop_sequences:
            raise bad_request(f"at most {self.settings.max_stop_sequences} stop sequences", "stop")
        if any(len(s) > self.settings.max_stop_length for s in stops):
            raise bad_request(f"stop sequences are at most {self.settings.max_stop_length} characters", "stop")
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")

    def _params(self, req: _Sampling, max_tokens: int, logprobs: int | None) -> SamplingParams:
        d = self.defaults
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature if req.temperature is not None else d.get("temperature", 1.0),
            top_p=req.top_p if req.top_p is not None else d.get("top_p", 1.0),
            top_k=max(req.top_k, 0) if "top_k" in req.model_fields_set else int(d.get("top_k", 0)),
            min_p=req.min_p,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            min_tokens=min(req.min_tokens, max_tokens),
            ignore_eos=req.ignore_eos,
            seed=req.seed,
            stop=tuple(req.stop_list),
            logprobs=logprobs,
            logit_bias=self._logit_bias(req.logit_bias),
            grammar=self._grammar(req.response_format),
        )

    def _logit_bias(self, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
        if not bias:
            return ()
        if len(bias) > self.settings.max_logit_bias:
            raise bad_request(f"logit_bias has at most {self.settings.max_logit_bias} entries", "logit_bias")
        vocab, out = self.tokenizer.vocab_size, []
        for key, value in bias.items():
            if not (key.isascii() and key.isdigit()) or not 0 <= int(key) < vocab:
                raise bad_request(
                    f"Invalid key in 'logit_bias': {key[:32]!r} is not a token id in [0, {vocab})", "logit_bias"
                )
            if not -LOGIT_BIAS_RANGE <= value <= LOGIT_BIAS_RANGE:
                raise bad_request(f"logit_bias values must be in [-100, 100], got {value}", "logit_bias")
            out.append((int(key), float(value)))
        return tuple(sorted(out))

    def _grammar(self, fmt: ResponseFormat | None) -> str | None:
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            schema: dict[str, Any] = JSON_OBJECT_SCHEMA
        elif fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise bad_request("response_format json_schema needs json_schema.schema", "response_format.json_schema")
        else:
            schema = fmt.json_schema.json_schema
        if self.grammars is None:
            raise unsupported("response_format", "structured output is not available on this server")
        key = json.dumps(schema, sort_keys=True)
        if key not in self._compiled:
            try:
                grammar = self.grammars.compile(schema)
            except GrammarError as exc:
                param = "response_format.json_schema"
                raise bad_request(f"invalid JSON schema: {exc}", param, "invalid_schema") from exc
            if len(self._compiled) >= _GRAMMAR_CACHE:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[key] = grammar
        return self._compiled[key]

    # ------------------------------------------------------------------ prompts

    def _prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts = [self.tokenizer.encode(prompt)]
        elif all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]  # type: ignore[arg-type]
        elif all(isinstance(p, str) for p in prompt):
            prompts = [self.tokenizer.encode(p) for p in prompt]  # type: ignore[arg-type]
        else:
            prompts = [list(p) for p in prompt]  # type: ignore[arg-type]
        for p in prompts:
            self.check_token_ids(p, "prompt")
        return prompts

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.tokenizer.vocab_size
        if not ids:
            raise bad_request(f"{param} must not be empty", param)
        if any(not 0 <= t < vocab for t in ids):
            raise bad_request(f"token ids must be in [0, {vocab})", param)

    def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        """Messages rendered with the bundle's chat template, then encoded (no special tokens added again)."""
        rendered = [
            # OpenAI's `developer` role is the system role of models trained before it (their templates know system)
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            | ({"name": m.name} if m.name else {})
            for m in messages
        ]
        try:
            ids = self.tokenizer.encode_chat(rendered, add_generation_prompt)
        except TemplateError as exc:
            raise bad_request(str(exc), "messages") from exc
        if not ids:
            raise bad_request("the rendered prompt is empty", "messages")
        return ids
