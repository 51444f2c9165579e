"""One policy for the native thread pools the project drives.

torch does the heavy work (prefill, encoders) on its own intra-op pool. numpy and faiss each bring an OpenBLAS
whose idle workers keep spinning after every call: on a machine with few cores they take the cores torch's
threads are about to use, and a 0.2 s matrix inverse took 10 s beside a loaded model. So the BLAS pools of the
libraries loaded beside torch run on one thread (their work here is small: KV codec transforms, index search),
and torch keeps the cores (torch's own BLAS, where it is a separate library, is left alone). The limit is
process-wide: an application that wants numpy's own threading sets `RAGZIP_BLAS_THREADS=0` (the libraries' own
defaults) or `RAGZIP_BLAS_THREADS=N`.

`limit_blas_threads()` is called where such a library is first used (KV codec profiles, the vector index, model
loads); it is cheap and idempotent, and covers each library loaded since the last call.

OpenMP threads that finish an operation spin while they wait for the next one. On an idle machine that saves a
wake-up; on a busy one (another tenant, the load generator, a second worker) the spinning threads take the
cores the working ones need, and the many small operations of a blended prefill each wait a scheduler slice:
with two other busy processes on 2 cores, KV reuse was slower than a full prefill (0.76x in bf16, 0.78x in fp32).
`process_defaults()` sets `OMP_WAIT_POLICY=PASSIVE` (waiting threads sleep) for the processes ragzip starts
itself (the CLI, the server): with both parts of the policy, 1.7x idle and 2.1x busy in bf16 (README, KV reuse).
It must run before torch is imported (libgomp reads it once); a value the user set wins. Python applications set
it themselves (see the README).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)
BLAS_THREADS_ENV = "RAGZIP_BLAS_THREADS"
_limited: set[str] = set()
_lock = threading.Lock()


OMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def process_defaults() -> dict[str, str]:
    """Set the OpenMP defaults above in this process's environment (never over a user's own value); returns what
    it set. Call it first thing in an entry point, before torch is imported."""
    applied = {k: v for k, v in OMP_DEFAULTS.items() if k not in os.environ}
    os.environ.update(applied)
    return applied


def blas_threads() -> int:
    """The BLAS thread count of the policy (0: leave the libraries alone)."""
    raw = os.environ.get(BLAS_THREADS_ENV, "1").strip()
    try:
        return max(0, int(raw))
    except ValueError:
        log.warning("%s=%r is not an integer; using 1", BLAS_THREADS_ENV, raw)
        return 1


def _torchs(filepath: str) -> bool:
    """torch's own BLAS (MKL in some builds, OpenBLAS in aarch64 wheels): it does the heavy work, so it keeps its
    threads."""
    path = filepath.lower()
    return "mkl" in path or any(part in ("torch", "torch.libs") for part in Path(path).parts)


def limit_blas_threads() -> list[str]:
    """Apply the policy to every BLAS library loaded in this process that it has not reached yet; returns the
    file paths newly limited."""
    threads = blas_threads()
    if threads == 0:
        return []
    from threadpoolctl import ThreadpoolController

    with _lock:
        controller = ThreadpoolController().select(user_api="blas")
        fresh = [lib for lib in controller.lib_controllers
                 if lib.filepath not in _limited and not _torchs(lib.filepath)]
        for lib in fresh:
            lib.set_num_threads(threads)
            _limited.add(lib.filepath)
        return [lib.filepath for lib in fresh]


__all__ = ["BLAS_THREADS_ENV", "OMP_DEFAULTS", "blas_threads", "limit_blas_threads", "process_defaults"]
