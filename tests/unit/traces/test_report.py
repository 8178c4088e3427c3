"""The report files of a replay or simulation, from hand-made records."""

from __future__ import annotations

import json
from pathlib import Path

from dynamo_bus.traces.report import RequestRecord, format_summary, write_report


def _records() -> list[RequestRecord]:
    return [
        RequestRecord(index=0, arrival_s=0.0, start_s=0.0, prompt_tokens=1000,
                      output_tokens=11, cached_tokens=0, ttft_ms=100.0, e2e_ms=600.0,
                      itl_ms=50.0, worker="w0"),
        RequestRecord(index=1, arrival_s=0.5, start_s=0.5, prompt_tokens=1000,
                      output_tokens=11, cached_tokens=500, ttft_ms=50.0, e2e_ms=550.0,
                      itl_ms=50.0, worker="w1"),
        RequestRecord(index=2, arrival_s=1.0, start_s=1.0, prompt_tokens=10,
                      error="503 no_worker: no live worker serves model 'm'"),
    ]


def test_write_report(tmp_path: Path) -> None:
    prefix = tmp_path / "reports" / "run"
    summary = write_report(prefix, _records(), title="Replay of t.jsonl",
                           meta={"command": "dynamo-bus replay t.jsonl",
                                 "settings": {"workers": 2, "strategy": "kv_aware"}})
    assert (summary["requests"], summary["completed"], summary["errors"]) == (3, 2, 1)
    assert summary["prefix_hit_rate"] == 0.25  # 500 of 2000 prompt tokens

    md = (tmp_path / "reports" / "run.md").read_text()
    assert md.startswith("# Replay of t.jsonl")
    assert "- **settings**: workers=2, strategy=kv_aware" in md
    assert "| prefix hit rate | 25.0% |" in md and "| errors | 1 |" in md
    assert "| TTFT | 75.0 |" in md and "run.png" in md

    body = json.loads((tmp_path / "reports" / "run.json").read_text())
    assert body["meta"]["command"] == "dynamo-bus replay t.jsonl"
    assert body["summary"]["completed"] == 2
    assert [r["index"] for r in body["records"]] == [0, 1, 2]
    assert body["records"][2]["error"].startswith("503")
    assert body["records"][1]["worker"] == "w1"
    assert (tmp_path / "reports" / "run.png").read_bytes()[:4] == b"\x89PNG"


def test_report_of_nothing_completed_is_still_valid(tmp_path: Path) -> None:
    summary = write_report(tmp_path / "none", _records()[2:], title="t", meta={})
    assert summary["completed"] == 0
    body = json.loads((tmp_path / "none.json").read_text())  # NaN statistics become null
    assert body["summary"]["ttft_ms"]["p50"] is None
    assert "| completed | 0 |" in format_summary(summary)
    assert (tmp_path / "none.png").stat().st_size > 0
