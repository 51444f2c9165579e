"""One settings object (env prefix RAGZIP_), read once by the CLI or the server and passed down."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "ragzip"


class Settings(BaseSettings):
    """Process-wide settings. Every field can be set with an environment variable `RAGZIP_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="RAGZIP_", extra="ignore")

    cache_dir: Path = Field(default_factory=_default_cache_dir, description="Converted models, KV store, caches")
    llm: str = Field(default="smollm2-135m-instruct", description="Local LLM (alias, local path or HF name)")
    tokenizer: str | None = Field(default=None, description="Tokenizer that counts budgets (default: the LLM's)")
    dtype: str = Field(default="auto", description="auto | bfloat16 | float32 for the local LLM")
    device: str = Field(default="auto", description="auto (cuda when available, else cpu) | cpu | cuda | cuda:N "
                                                    "for every model: compressors, embedder, local LLM")
    num_threads: int | None = Field(default=None, description="torch intra-op threads (default: torch's)")
