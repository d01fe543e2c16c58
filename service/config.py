"""Settings: one pydantic-settings class, from flags (`--max-num-seqs 8`) or environment (`SERVE_MAX_NUM_SEQS=8`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SERVE_", cli_kebab_case=True, cli_prog_name="python -m service", extra="ignore"
    )

    # where and what
    bundle: Path = Field(Path("bundles/smollm2-135m"), description="bundle directory written by `python -m export`")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    served_model_name: str | None = Field(None, description="model id in the API (default: the bundle's name)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when onnxruntime finds a GPU")
    intra_op_threads: int = Field(0, ge=0, description="onnxruntime CPU threads (0: one per core)")
    verify_golden: bool = Field(True, description="check the bundle's golden outputs at start; refuse on mismatch")

    # batching and the KV cache
    max_num_seqs: int = Field(16, ge=1, le=1024, description="sequences decoded together (cache slots)")
    max_model_len: int = Field(2048, ge=16, description="longest prompt + completion (capped by the bundle)")
    prefill_chunk: int = Field(256, ge=16, description="prompt tokens prefilled per engine step")

    # request limits
    default_max_tokens: int = Field(512, ge=1, description="chat completions without max_tokens (completions: 16)")
    max_n: int = Field(8, ge=1, le=128, description="largest n (choices per request)")
    max_logprobs: int = Field(20, ge=0, le=20)
    max_stop_sequences: int = Field(8, ge=0)
    max_stop_length: int = Field(256, ge=1)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("bundle")
    @classmethod
    def _bundle_is_dir(cls, v: Path) -> Path:
        if not v.is_dir():
            raise ValueError(f"{v}: no such bundle directory (run `make export` or `python -m export`)")
        return v

    @model_validator(mode="after")
    def _chunk_fits(self) -> Settings:
        self.prefill_chunk = min(self.prefill_chunk, self.max_model_len)
        return self
