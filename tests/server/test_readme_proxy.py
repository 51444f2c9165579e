"""The README's LangChain app in front of the proxy runs as written (against a live local-engine proxy)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from ragzip.engine import LocalEngine
from ragzip.server.app import create_app
from ragzip.server.config import ServerConfig

if TYPE_CHECKING:
    from .conftest import ServerFactory  # type: ignore[import-not-found]


def test_chatopenai_through_the_proxy(readme_example: Any, live_server: ServerFactory, engine: LocalEngine,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    import langchain_openai  # noqa: F401 - the langchain extra (installed by setup): missing is a failure
    cfg = ServerConfig(api_keys=["sk-local"], max_new_tokens=32, default_max_new_tokens=32)
    proxy = live_server(create_app(cfg, engine=engine))
    code = readme_example("langchain-proxy")
    assert "http://127.0.0.1:8001/v1" in code
    exec(compile(code.replace("http://127.0.0.1:8001", proxy.url), "README.md", "exec"), {})  # noqa: S102
    assert capsys.readouterr().out.strip()
