"""Server test fixtures: the local engine (loaded once) and real uvicorn servers on loopback ports."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import uvicorn
from fastapi import FastAPI, Request

from ragzip.engine import LocalEngine
from ragzip.eval.harness import free_port


class LiveServer:
    """Serves `app` on 127.0.0.1 at a free port (or `port`, to restart a stopped server) until `stop()`."""

    def __init__(self, app: Any, *, port: int = 0, startup_timeout_s: float = 120.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + startup_timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("server thread exited during startup")
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


class ServerFactory(Protocol):
    def __call__(self, app: Any) -> LiveServer: ...


@pytest.fixture(scope="session")
def engine() -> LocalEngine:
    """The embedded SmolLM2-135M, loaded once for every server test that needs the local engine."""
    return LocalEngine()


@pytest.fixture(scope="module")
def live_server() -> Iterator[ServerFactory]:
    """Start apps on loopback ports; all are stopped when the module's tests are done."""
    started: list[LiveServer] = []

    def start(app: Any) -> LiveServer:
        server = LiveServer(app)
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture()
def redis_server(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A redis-server of this test's own (so that killing it disturbs nobody); skipped without the binary."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server not installed (bash scripts/services.sh start installs it)")
    port = free_port()
    state: dict[str, Any] = {"url": f"redis://127.0.0.1:{port}/0"}

    def start() -> None:
        state["proc"] = subprocess.Popen([exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                          "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
        wait_for(lambda: _answers(port), what="redis to start")

    def kill() -> None:
        state["proc"].kill()
        state["proc"].wait(timeout=10)

    state.update(start=start, kill=kill)
    start()
    yield state
    if state["proc"].poll() is None:
        kill()


def _answers(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=port, socket_timeout=0.2, socket_connect_timeout=0.2).ping())
    except (redis.exceptions.RedisError, OSError):
        return False


def wait_for(predicate: Callable[[], Any], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def echo_upstream(seen: list[dict[str, Any]]) -> Any:
    """An OpenAI-compatible upstream that records each body in `seen` and answers with the JSON of the messages
    it got (so a test reads the prompt the LLM received)."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        seen.append(body)
        return {"id": "echo", "object": "chat.completion", "created": 0, "model": body.get("model", "echo"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": json.dumps(body["messages"])},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": []}

    return app
