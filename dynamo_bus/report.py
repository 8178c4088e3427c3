"""What a replay or a simulation measured, per request and in summary.

Both ``dynamo-bus replay`` (live, against a deployment) and ``dynamo-bus simulate``
(offline, virtual clock) produce one :class:`RequestRecord` per trace request; the
summary and the report files are computed from those alone, so the two compare.

Percentiles are taken as Dynamo's replay takes them (the sorted value at index
``round((n - 1) * p / 100)``), so figures compare with its reports too.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec


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
