from __future__ import annotations

from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "chunks.jsonl"


@pytest.mark.slow
def test_kvcodec_suite_runs_on_the_local_llm(tmp_path: Path) -> None:
    from ragzip.eval.suites import kvcodec

    # setup installs the local LLM: a loader regression is a failure, not a skip
    result = kvcodec.run(FIXTURE, limit=1, seed=0,
                         options={"prefix": "48", "cont": "16", "calib": "1", "save_profile": str(tmp_path / "p"),
                                  "blend": "1"})
    for key in ("bits_per_element", "ratio_vs_int8", "top1_agreement", "kl", "top1_agreement_int8", "kl_int8",
                "decode_mb_s", "load_vs_recompute", "blend_kl", "blend_kl_int8", "blend_kl_raw"):
        assert isinstance(result[key], float), key
    assert result["default_codec"] == "kvtc:2" and result["blend_examples"] == 1
    assert result["chunks"] == 1 and (tmp_path / "p").exists()
    rows = {row["codec"]: row for row in result["table"]}
    assert rows["raw"]["top1"] == 1.0 and rows["raw"]["kl"] == 0.0
    assert rows["cachegen:0"]["bits"] > rows["cachegen:5"]["bits"]
    assert rows["kvtc:0"]["bits"] > rows["kvtc:6"]["bits"] and rows["kvtc:2"]["bits"] < rows["int8"]["bits"]
