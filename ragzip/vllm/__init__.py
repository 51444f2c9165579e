"""ragzip inside vLLM: a v1 KV connector backed by ragzip's chunk store, and the prompt layout it relies on.

`RagzipConnector` is what vLLM loads (`"kv_connector": "RagzipConnector", "kv_connector_module_path":
"ragzip.vllm"`); it imports vLLM, so it is loaded on first use and `import ragzip.vllm` works without vLLM.
`ragzip.vllm.plan` (claims, segments, saves) and `ragzip.vllm.layout` (the proxy's prompt layout) need no vLLM.
See docs/vllm.md.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RagzipConnector"]


def __getattr__(name: str) -> Any:
    if name == "RagzipConnector":  # imports vLLM: only where vLLM runs it
        from ragzip.vllm.connector import RagzipConnector

        return RagzipConnector
    raise AttributeError(f"module 'ragzip.vllm' has no attribute {name!r}")
