"""Traces: Mooncake traces (``mooncake``), ``record`` of the request log, ``replay``
against a deployment, offline ``simulate`` on a virtual clock, and the ``report`` they
write; ``commands`` holds the ``dynamo-bus record|replay|simulate`` commands.

The names below are the package's public surface. Each is imported from its module on
first use, so the CLI can build its parser without numpy, the engines or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dynamo_bus.traces.mooncake import (
        TRACE_BLOCK_SIZE,
        TraceRequest,
        read_trace,
        reuse_bound,
        summary_line,
        synth_tokens,
        write_trace,
    )
    from dynamo_bus.traces.report import RequestRecord, format_summary, summarize, write_report
    from dynamo_bus.traces.simulate import SimResult, SimSettings, simulate

_HOME = {
    "TRACE_BLOCK_SIZE": "mooncake", "TraceRequest": "mooncake", "read_trace": "mooncake",
    "reuse_bound": "mooncake", "summary_line": "mooncake", "synth_tokens": "mooncake",
    "write_trace": "mooncake", "RequestRecord": "report", "format_summary": "report",
    "summarize": "report", "write_report": "report", "SimResult": "simulate",
    "SimSettings": "simulate", "simulate": "simulate",
}
__all__ = ["TRACE_BLOCK_SIZE", "RequestRecord", "SimResult", "SimSettings", "TraceRequest",
           "format_summary", "read_trace", "reuse_bound", "simulate", "summarize",
           "summary_line", "synth_tokens", "write_report", "write_trace"]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
