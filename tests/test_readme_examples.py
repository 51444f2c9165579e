"""The README's Python examples run as written (the proxy one is in tests/server/test_readme_proxy.py)."""

from __future__ import annotations

from typing import Any

import pytest


def _run(code: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the project's own README
    return namespace


def test_python_example(readme_example: Any) -> None:
    ns = _run(readme_example("python"))
    assert ns["result"].tokens_after <= ns["result"].tokens_before


def test_langchain_example(readme_example: Any) -> None:
    ns = _run(readme_example("langchain"))
    assert ns["docs"] and "ragzip" in ns["docs"][0].metadata


def test_llmlingua_example(readme_example: Any, capsys: pytest.CaptureFixture[str]) -> None:
    ns = _run(readme_example("llmlingua"))
    assert ns["res"]["compressed_tokens"] <= 30 and "North Sea" in ns["res"]["compressed_prompt"]
    assert capsys.readouterr().out.strip()


def test_llama_index_example(readme_example: Any, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("llama_index.core")
    ns = _run(readme_example("llama-index"))
    assert ns["response"].source_nodes and capsys.readouterr().out.strip()
