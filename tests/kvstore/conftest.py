from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ragzip.kvstore.record import ChunkRecord

REPO = Path(__file__).resolve().parents[2]
REDIS_PORT = int(os.environ.get("RAGZIP_REDIS_PORT", "6390"))
REDIS_URL = os.environ.get("RAGZIP_TEST_REDIS_URL", f"redis://127.0.0.1:{REDIS_PORT}/0")


def make_record(seed: int = 0, num_tokens: int = 12, num_layers: int = 3, fingerprint: str = "test-fp",
                dtype: torch.dtype = torch.float32) -> ChunkRecord:
    gen = torch.Generator().manual_seed(seed)
    layers = [(torch.randn(2, num_tokens, 8, generator=gen).to(dtype),
               torch.randn(2, num_tokens, 8, generator=gen).to(dtype)) for _ in range(num_layers)]
    ids = tuple(int(t) for t in torch.randint(0, 1000, (num_tokens,), generator=gen))
    return ChunkRecord(fingerprint, ids, 0, layers, dtype)


@pytest.fixture
def record_factory() -> Callable[..., ChunkRecord]:
    return make_record


def _redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", REDIS_PORT), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A real redis-server on loopback, started by scripts/services.sh if it is not already up."""
    if not _redis_up():
        proc = subprocess.run(["bash", str(REPO / "scripts" / "services.sh"), "start"], capture_output=True,
                              text=True, timeout=300, check=False)
        if not _redis_up():
            pytest.skip(f"redis-server could not be started by scripts/services.sh: {proc.stderr.strip()[-300:]}")
    return REDIS_URL


@pytest.fixture(scope="session")
def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=99, intermediate_size=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_gemma() -> torch.nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                           vocab_size=99, intermediate_size=64, head_dim=8, sliding_window=4,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(cfg).eval()
