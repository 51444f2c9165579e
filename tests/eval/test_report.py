from __future__ import annotations

import json
import shutil
from pathlib import Path

from ragzip.eval.report import PLAN, README_END, README_START, run_report, update_readme

FIXTURES = Path(__file__).parent.parent / "fixtures" / "report_data"
EXPECTED_PLOTS = {"quality_f1", "quality_nll", "quality_survival", "quality_support", "latency", "kv_ttft",
                  "kv_quality", "codec", "proxy"}


def test_quick_report_on_tiny_fixtures_produces_every_table_and_plot(tmp_path: Path, tiny_reader: str) -> None:
    out = tmp_path / "report"
    results = run_report(FIXTURES, out, quick=True, limit=1, log=lambda _: None, reader=tiny_reader)
    assert results["errors"] == {}
    assert set(results["suites"]) == {run.key for run in PLAN} | {"proxy"}
    assert EXPECTED_PLOTS <= set(results["plots"])
    for name in results["plots"].values():
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
    saved = json.loads((out / "results.json").read_text())
    assert saved["machine"]["cores"] and saved["suites"]["fidelity"]["results"]["rows"]
    assert saved["suites"]["fidelity"]["options"]["reader"] == tiny_reader
    report = (out / "report.md").read_text()
    for key in [run.key for run in PLAN] + ["proxy"]:
        assert f"## {key}" in report
    proxy = results["suites"]["proxy"]["results"]
    assert proxy["server_errors"] == 0 and proxy["client_timeouts"] == 0  # none outside the upstream's outage
    assert proxy["errors_during_outage"] > 0 and proxy["first_served_after_restart_s"] is not None
    rows = {r["label"]: r for r in results["suites"]["fidelity"]["results"]["rows"]}
    assert rows["none"]["rate"] == 1.0 and rows["random@0.33"]["rate"] < 0.4
    assert "| exit@0.33 |" in report

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{README_START}\nOLD-SECTION\n{README_END}\n\ntail\n")
    update_readme(readme, results, out, tmp_path / "docs" / "results")
    text = readme.read_text()
    assert "OLD-SECTION" not in text and text.endswith("tail\n") and "Quality vs compression" in text
    assert f"reader {tiny_reader}" in text and "| embed-topk@0.33 |" in text
    assert (tmp_path / "docs" / "results" / results["plots"]["quality_f1"]).exists()
    shutil.rmtree(out)
