"""Traces: Mooncake traces, record, replay, offline simulation and reports."""
