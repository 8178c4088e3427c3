"""What a replay or a simulation measured, per request and in summary.

Both ``dynamo-bus replay`` (live, against a deployment) and ``dynamo-bus simulate``
(offline, virtual clock) produce one :class:`RequestRecord` per trace request; the
summary and the report files are computed from those alone, so the two compare.

:func:`write_report` writes ``PREFIX.md`` (what ran, the summary tables),
``PREFIX.json`` (the same plus every record, for scripts) and ``PREFIX.png`` (TTFT CDF,
prefix hit rate over time, requests in flight over time).

Percentiles are taken as Dynamo's replay takes them (the sorted value at index
``round((n - 1) * p / 100)``), so figures compare with its reports too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np


class RequestRecord(msgspec.Struct, omit_defaults=True):
    index: int                    # position in the trace
    arrival_s: float              # when it was due, from the start of the replay
    start_s: float                # when it was sent
    prompt_tokens: int
    output_tokens: int = 0
    cached_tokens: int = 0
    ttft_ms: float | None = None  # from start_s to the first token
    e2e_ms: float | None = None   # from start_s to the last token
    itl_ms: float | None = None   # mean gap between output tokens after the first
    worker: str = ""
    error: str | None = None


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[round((len(ordered) - 1) * p / 100)]


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {"mean": sum(values) / len(values) if values else float("nan"),
            "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99)}


def summarize(records: Sequence[RequestRecord]) -> dict[str, object]:
    ok = [r for r in records if r.error is None and r.e2e_ms is not None]
    prompt = sum(r.prompt_tokens for r in ok)
    end = max((r.start_s + (r.e2e_ms or 0.0) / 1000 for r in ok), default=0.0)
    start = min((r.start_s for r in ok), default=0.0)
    span = max(end - start, 1e-9)
    output = sum(r.output_tokens for r in ok)
    return {
        "requests": len(records),
        "completed": len(ok),
        "errors": len(records) - len(ok),
        "prefix_hit_rate": sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0,
        "ttft_ms": _stats([r.ttft_ms for r in ok if r.ttft_ms is not None]),
        "itl_ms": _stats([r.itl_ms for r in ok if r.itl_ms is not None]),
        "e2e_ms": _stats([r.e2e_ms for r in ok if r.e2e_ms is not None]),
        "duration_s": span,
        "requests_per_s": len(ok) / span,
        "output_tokens_per_s": output / span,
        "input_tokens_per_s": prompt / span,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as two Markdown tables: counts and rates, then latencies in ms."""
    s = summary
    rows = [("requests", f"{s['requests']}"), ("completed", f"{s['completed']}"),
            ("errors", f"{s['errors']}"), ("prefix hit rate", f"{s['prefix_hit_rate']:.1%}"),
            ("duration", f"{s['duration_s']:.2f} s"),
            ("throughput", f"{s['requests_per_s']:.2f} req/s, "
                           f"{s['output_tokens_per_s']:,.0f} output tok/s, "
                           f"{s['input_tokens_per_s']:,.0f} input tok/s")]
    lines = ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
             "| ms | mean | p50 | p90 | p99 |", "|---|---:|---:|---:|---:|"]
    for key, label in (("ttft_ms", "TTFT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E")):
        st = s[key]
        lines.append(f"| {label} | " + " | ".join(f"{st[p]:,.1f}" for p in
                                                   ("mean", "p50", "p90", "p99")) + " |")
    return "\n".join(lines)


def _meta_value(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def write_report(prefix: str | Path, records: Sequence[RequestRecord], *, title: str,
                 meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``PREFIX.md`` (meta and summary tables), ``PREFIX.json`` (meta, summary and
    every record) and ``PREFIX.png`` (TTFT CDF, prefix hit rate over time, requests in
    flight over time). Returns the summary."""
    prefix = Path(prefix)
    if prefix.parent != Path():
        prefix.parent.mkdir(parents=True, exist_ok=True)
    summary = summarize(records)
    md = [f"# {title}", "", *(f"- **{k}**: {_meta_value(v)}" for k, v in meta.items()), "",
          format_summary(summary), "", f"![plots]({prefix.name}.png)", ""]
    prefix.with_name(prefix.name + ".md").write_text("\n".join(md), encoding="utf-8")
    body = {"title": title, "meta": meta, "summary": summary,
            "records": [msgspec.structs.asdict(r) for r in records]}  # every field, always
    # msgspec writes NaN (no completed request) as null, so the file stays valid JSON.
    prefix.with_name(prefix.name + ".json").write_bytes(
        msgspec.json.format(msgspec.json.encode(body), indent=1))
    _plot(prefix.with_name(prefix.name + ".png"), records, title)
    return summary


def _plot(path: Path, records: Sequence[RequestRecord], title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ok = [r for r in records if r.error is None and r.e2e_ms is not None]
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title)
    cdf, hits, flight = fig.subplots(1, 3)

    ttft = sorted(r.ttft_ms for r in ok if r.ttft_ms is not None)
    if ttft:
        cdf.step(ttft, np.arange(1, len(ttft) + 1) / len(ttft), where="post")
    cdf.set(title="TTFT CDF", xlabel="TTFT (ms)", ylabel="share of requests", ylim=(0, 1.02))
    cdf.grid(alpha=0.3)

    timed = [r for r in ok if r.ttft_ms is not None]
    if timed:
        first = np.array([r.start_s + (r.ttft_ms or 0.0) / 1000 for r in timed])
        cached = np.array([r.cached_tokens for r in timed], dtype=float)
        prompt = np.array([r.prompt_tokens for r in timed], dtype=float)
        edges = np.histogram_bin_edges(first, bins=max(1, min(40, len(timed) // 4)))
        hit, _ = np.histogram(first, edges, weights=cached)
        total, _ = np.histogram(first, edges, weights=prompt)
        mid = (edges[:-1] + edges[1:]) / 2
        has = total > 0
        hits.plot(mid[has], hit[has] / total[has], marker="o", markersize=3)
    hits.set(title="prefix hit rate (binned by first token)", xlabel="time (s)",
             ylabel="cached / prompt tokens", ylim=(0, 1.02))
    hits.grid(alpha=0.3)

    if ok:
        events = sorted([(r.start_s, 1) for r in ok] +
                        [(r.start_s + (r.e2e_ms or 0.0) / 1000, -1) for r in ok])
        times = [0.0] + [t for t, _ in events]
        counts = np.cumsum([0] + [d for _, d in events])
        flight.step(times, counts, where="post")
    flight.set(title="requests in flight", xlabel="time (s)", ylabel="requests")
    flight.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
