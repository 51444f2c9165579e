"""Shared by the load-test and fuzz scripts: a fast stub upstream in a thread, and a `ragzip serve` subprocess.

Everything binds to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stub_app() -> FastAPI:
    """An OpenAI-compatible upstream that answers at once (so the figures measure the proxy)."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": "stub", "object": "model", "created": 0, "owned_by": "ragzip"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        chunk = {"id": "stub", "object": "chat.completion.chunk", "created": 0, "model": "stub"}
        if body.get("stream"):
            async def events() -> Any:
                for piece in ("The ", "answer."):
                    delta = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                    yield f"data: {json.dumps({**chunk, 'choices': [delta]})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return {"id": "stub", "object": "chat.completion", "created": 0, "model": "stub",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "The answer."},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}

    return app


class StubUpstream:
    """`stub_app` served by a subprocess on a fixed loopback port, so that it can be killed (SIGKILL, as a crash)
    and started again on the same port for chaos runs."""

    def __init__(self, startup_timeout_s: float = 60.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "ragzip.eval.harness", "--stub-port", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            try:
                if httpx.get(f"{self.url}/models", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("stub upstream did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        self.kill()


class ProxyProcess:
    """`ragzip serve` in a subprocess (its own memory, measurable through /proc). `threads`: torch threads of the
    server (of each worker; default 1, or the cores split between `workers`)."""

    def __init__(self, config: dict[str, Any], *, startup_timeout_s: float = 180.0,
                 threads: int | None = None) -> None:
        self.port = free_port()
        self.dir = tempfile.TemporaryDirectory()
        cfg = Path(self.dir.name) / "server.json"
        cfg.write_text(json.dumps(config), encoding="utf-8")
        exe = Path(sys.executable).with_name("ragzip")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if threads is not None or config.get("workers", 1) == 1:
            env["OMP_NUM_THREADS"] = env["RAGZIP_NUM_THREADS"] = str(threads or 1)
        self.log = open(Path(self.dir.name) / "server.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([str(exe), "serve", "--host", "127.0.0.1", "--port", str(self.port),
                                      "--config", str(cfg)], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_until_up(self.proc, f"{self.url}/healthz", Path(self.dir.name) / "server.log", startup_timeout_s,
                      what="proxy")

    def rss_mb(self) -> float:
        """The resident memory of the server and its worker processes."""
        return process_tree_rss_mb(self.proc.pid)

    def stop(self) -> None:
        terminate(self.proc, 15)
        self.log.close()
        self.log_text = (Path(self.dir.name) / "server.log").read_text(errors="replace")  # kept for the caller
        self.dir.cleanup()


def terminate(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM, then SIGKILL if `proc` has not exited after `timeout_s`."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def wait_until_up(proc: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float, *, what: str) -> None:
    """Until `url` answers 200; RuntimeError (with the log's tail) if `proc` exits first, TimeoutError after
    `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not start")
        time.sleep(0.2)


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def child_pids(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def process_tree_rss_mb(pid: int) -> float:
    """The resident memory of `pid` and its children (a server and its workers)."""
    return sum(_rss_mb(p) for p in [pid, *child_pids(pid)])


def worker_pids(pid: int) -> list[int]:
    """The worker processes of a `ragzip serve --workers` supervisor (multiprocessing's resource tracker left
    out)."""
    found = []
    for child in child_pids(pid):
        try:
            if b"resource_tracker" not in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except OSError:
            continue
    return found


LITELLM_VENV = Path(__file__).resolve().parents[1] / ".venv-litellm"


class LiteLLMProxy:
    """LiteLLM's own proxy (from .venv-litellm: scripts/litellm_env.sh) on loopback, in front of `upstream` (an
    OpenAI-compatible base URL with /v1) as model `model_name`, with optional `guardrails` entries."""

    def __init__(self, upstream: str, *, model_name: str = "stub", guardrails: list[dict[str, Any]] | None = None,
                 startup_timeout_s: float = 180.0) -> None:
        exe = LITELLM_VENV / "bin" / "litellm"
        if not exe.exists():
            raise FileNotFoundError(f"{exe} is missing: run `bash scripts/litellm_env.sh` (or `make test`)")
        self.dir = tempfile.TemporaryDirectory()
        folder = Path(self.dir.name)
        config = {"model_list": [{"model_name": model_name, "litellm_params": {
            "model": f"openai/{model_name}", "api_base": upstream, "api_key": "unused"}}],
                  "guardrails": guardrails or []}
        path = folder / "config.json"  # JSON is YAML: LiteLLM reads it as its config.yaml
        path.write_text(json.dumps(config), encoding="utf-8")
        self.master_key = "sk-" + os.urandom(16).hex()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "LITELLM_MASTER_KEY": self.master_key, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
               "LITELLM_LOG": "ERROR", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        self.log_path = folder / "litellm.log"
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen([str(exe), "--config", str(path), "--host", "127.0.0.1", "--port", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=folder)
        try:
            wait_until_up(self.proc, f"{self.url}/health/liveliness", self.log_path, startup_timeout_s,
                          what="LiteLLM")
        except (RuntimeError, TimeoutError):
            self.stop()
            raise

    def rss_mb(self) -> float:
        return process_tree_rss_mb(self.proc.pid)

    def stop(self) -> None:
        terminate(self.proc, 20)
        self.log.close()
        self.dir.cleanup()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Serve the stub upstream on 127.0.0.1 (for StubUpstream).")
    ap.add_argument("--stub-port", type=int, required=True)
    args = ap.parse_args()
    uvicorn.run(stub_app(), host="127.0.0.1", port=args.stub_port, log_level="warning")
