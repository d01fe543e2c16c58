"""Settings: one pydantic-settings class, from flags (`--max-num-seqs 8`) or environment (`SERVE_MAX_NUM_SEQS=8`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, CliImplicitFlag, SettingsConfigDict

# Not a setting: glibc reads its tunables at process start, so the environment carries it (the Makefile and the image
# set it; the server logs whether it is on). malloc then asks for transparent huge pages for its large blocks,
# onnxruntime's packed weights among them, and int4 decodes one row about 15% faster (docs/BENCHMARKS.md).
HUGE_PAGES = "glibc.malloc.hugetlb=1"  # in GLIBC_TUNABLES


def huge_pages(environ: Mapping[str, str]) -> bool:
    """Whether this environment's GLIBC_TUNABLES (name=value entries joined by ':') turns HUGE_PAGES on."""
    return HUGE_PAGES in environ.get("GLIBC_TUNABLES", "").split(":")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SERVE_", cli_kebab_case=True, cli_prog_name="python -m service", extra="ignore"
    )

    # where and what
    bundle: Path = Field(Path("bundles/smollm2-135m"), description="bundle directory written by `python -m export`")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535, description="0: a free port, named in the log line 'listening on ...'")
    served_model_name: str | None = Field(None, description="model id in the API (default: the bundle's name)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when onnxruntime finds a GPU")
    intra_op_threads: int = Field(0, ge=0, description="onnxruntime CPU threads (0: one per core)")
    verify_golden: bool = Field(True, description="check the bundle's golden outputs at start; refuse on mismatch")
    cuda_graphs: CliImplicitFlag[bool] = Field(
        True, description="on CUDA, replay decode steps from captured CUDA graphs (--no-cuda-graphs: plain calls)"
    )
    reduce_logits: CliImplicitFlag[bool] = Field(
        True,
        description="on CUDA with graphs, reduce each decode step's logits on the device to what sampling reads (each "
        "row's 128 largest, ...); --no-reduce-logits copies every logit to the host",
    )

    # batching and the KV cache
    max_num_seqs: int = Field(16, ge=1, le=1024, description="sequences decoded together (cache slots)")
    max_model_len: int = Field(2048, ge=16, description="longest prompt + completion (capped by the bundle)")
    max_num_batched_tokens: int = Field(
        2048, ge=16, description="tokens per engine step: every decoding sequence's one, then prompt chunks"
    )
    prefill_chunk: int = Field(
        0,
        ge=0,
        description="a prompt's most tokens per engine step, 0 or at least 16 (0: 256 on the CPU, where a long prompt "
        "prefills faster in chunks; the token budget on CUDA)",
    )
    prefix_cache: CliImplicitFlag[bool] = Field(
        True, description="reuse the cached keys and values of a prompt's longest computed prefix (--no-prefix-cache)"
    )

    # backpressure: checked before a request is tokenized; past either bound, 429 with Retry-After
    max_waiting_requests: int = Field(256, ge=1, description="sequences waiting for a cache slot")
    max_queued_prompt_tokens: int = Field(262144, ge=1, description="prompt tokens waiting for a cache slot")
    unready_when_saturated: bool = Field(False, description="/ready answers 503 while the waiting queue is full")

    # request limits (400 beyond each)
    max_body_bytes: int = Field(1_048_576, ge=1024, description="request body size (413 beyond)")
    max_header_bytes: int = Field(16384, ge=1024, description="HTTP header block size (the server refuses beyond)")
    max_prompt_tokens: int = Field(0, ge=0, description="prompt tokens (0: the context length)")
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    max_messages: int = Field(256, ge=1, description="messages in one chat request")
    request_timeout: float = Field(600.0, gt=0, description="seconds a request may run before it ends with an error")
    default_max_tokens: int = Field(512, ge=1, description="chat completions without max_tokens (completions: 16)")
    max_n: int = Field(8, ge=1, le=128, description="largest n (choices per request)")
    max_logprobs: int = Field(20, ge=0, le=20)
    max_stop_sequences: int = Field(8, ge=0)
    max_stop_length: int = Field(256, ge=1)
    max_logit_bias: int = Field(300, ge=0, description="entries in one request's logit_bias")
    sse_keepalive: float = Field(
        15.0, gt=0, description="seconds without an event after which a stream gets an SSE comment (keep-alive)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # access
    api_keys: str = Field("", description="comma-separated API keys; empty: no authentication", repr=False)
    api_key_file: Path | None = Field(None, description="file with one API key per line (added to --api-keys)")
    metrics_require_key: bool = Field(False, description="/metrics asks for an API key too")
    cors_origins: str = Field("", description="comma-separated allowed origins; empty: CORS off")
    drain_timeout: float = Field(30.0, ge=0, description="on SIGTERM, seconds to let running requests finish")

    def keys(self) -> list[str]:
        keys = [k.strip() for k in self.api_keys.split(",") if k.strip()]
        if self.api_key_file is not None:
            keys += [line.strip() for line in self.api_key_file.read_text().splitlines() if line.strip()]
        return keys

    def origins(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @field_validator("bundle")
    @classmethod
    def _bundle_is_dir(cls, v: Path) -> Path:
        if not v.is_dir():
            raise ValueError(f"{v}: no such bundle directory (run `make export` or `python -m export`)")
        return v

    @field_validator("max_num_batched_tokens")
    @classmethod
    def _room_for_prompts(cls, v: int, info: ValidationInfo) -> int:
        """Every decoding sequence takes one of a step's tokens first: a budget no larger than the slots would
        leave admitted prompts waiting for decodes to end (vLLM refuses it too)."""
        seqs = info.data.get("max_num_seqs")
        if seqs is not None and v <= seqs:
            raise ValueError(f"must be more than max_num_seqs ({seqs}): decoding sequences take one token each")
        return v

    @field_validator("prefill_chunk")
    @classmethod
    def _whole_chunks(cls, v: int) -> int:
        if 0 < v < 16:
            raise ValueError("0 (the device's default) or at least 16")
        return v

    @field_validator("cors_origins")
    @classmethod
    def _explicit_origins(cls, v: str) -> str:
        if "*" in v:
            raise ValueError("CORS origins must be listed explicitly ('*' is refused)")
        return v

    @field_validator("api_key_file")
    @classmethod
    def _key_file_readable(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"{v}: no such API key file")
        return v
