"""Loading the default budget tokenizer from several threads at once in a fresh process (a server worker's warm-up
thread and its first requests): transformers' lazy first import is not thread-safe, and without the load lock this
failed with "cannot import name 'AutoTokenizer'" in 3 of 3 runs."""

from __future__ import annotations

import os
import subprocess
import sys

RACE = """
import threading
from ragzip.tokens import get_token_counter
errors = []
def load():
    try:
        get_token_counter(None).count("a b c")
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=load) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(len(errors), errors[:1])
"""


def test_concurrent_first_tokenizer_loads_all_succeed() -> None:
    out = subprocess.run([sys.executable, "-c", RACE], capture_output=True, text=True, timeout=300, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.stdout.startswith("0 "), out.stdout + out.stderr[-2000:]
