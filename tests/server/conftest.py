"""Server test fixtures: the local engine (loaded once) and real uvicorn servers on loopback ports."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

import pytest
import uvicorn

from ragzip.engine import LocalEngine


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
