"""Disaggregation at scale, offline: the Mooncake synthetic trace through our router's
policy in front of simulated engines (``dynamo-bus simulate``, Dynamo's mocker timing),
aggregated against disaggregated at equal worker count, each beside NVIDIA Dynamo
1.6.1's own offline replay of the same trace with the same workers (its KV router,
its mocker, its disaggregated prefill/decode flow), run in the same invocation.

Same on both sides: 16,384 device blocks of 16 tokens and 16,384 host-tier blocks per
worker, 256 sequences and 8,192 batched tokens per step, engine and arrival speedup 2,
KV transfer at 50 GB/s of 23,040 bytes per token. Where the two differ, by design: our
decode worker reads only the blocks it lacks (Dynamo's replay charges the whole prompt
by default) and then computes the prompt's last partial block itself, a prefill step
in the mocker's timing (Dynamo's decode worker skips the prompt entirely). ITL is
reported both ways: every token's gap (Dynamo's ``*_itl_ms``) and each request's mean
gap (Dynamo's ``*_tpot_ms``).

    python bench/disagg_scale.py                 # 8 aggregated, 4P+4D, 6P+2D
    python bench/disagg_scale.py --limit 1000 --no-dynamo

Writes bench/results/disagg_scale.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dynamo_bus.traces.mooncake import read_trace  # noqa: E402
from dynamo_bus.traces.report import percentile  # noqa: E402
from dynamo_bus.traces.simulate import SimSettings, simulate  # noqa: E402

TRACE = ROOT.parent / "shared" / "traces" / "synthetic_trace.jsonl"
PEER = ROOT / ".peers" / "dynamo" / "bin" / "python"
OUT = ROOT / "bench" / "results" / "disagg_scale"
SHAPES = [("8 aggregated", 8, 0), ("4 prefill + 4 decode", 4, 4), ("6 prefill + 2 decode", 2, 6)]
METRICS = ("ttft_p50", "ttft_p99", "itl_p50", "itl_p99", "tpot_p50", "tpot_p99", "req_s",
           "out_tok_s", "reuse")


def ours(a: argparse.Namespace, workers: int, prefill: int) -> dict[str, Any]:
    trace = read_trace(a.trace, limit=a.limit)
    r = simulate(trace, SimSettings(
        workers=workers, prefill_workers=prefill, num_blocks=a.blocks, host_blocks=a.blocks,
        engine_speedup=a.speedup, arrival_speedup=a.arrival_speedup, transfer_bandwidth=50e9,
        disagg_min_prefill_tokens=a.min_prefill))
    ends = [rec.arrival_s + rec.e2e_ms / 1000 for rec in r.records if rec.e2e_ms is not None]
    span = max(ends) - min(rec.arrival_s for rec in r.records)
    tpot = [rec.itl_ms for rec in r.records if rec.itl_ms is not None]
    return {"ttft_p50": percentile(r.ttft_ms, 50), "ttft_p99": percentile(r.ttft_ms, 99),
            "itl_p50": percentile(r.token_itl_ms, 50), "itl_p99": percentile(r.token_itl_ms, 99),
            "tpot_p50": percentile(tpot, 50), "tpot_p99": percentile(tpot, 99),
            "req_s": len(ends) / span,
            "out_tok_s": sum(rec.output_tokens for rec in r.records) / span,
            "reuse": r.reuse, "wall_s": r.wall_s, "preemptions": r.preemptions}


def dynamo(a: argparse.Namespace, workers: int, prefill: int) -> dict[str, Any]:
    cmd = [str(PEER), str(ROOT / "bench" / "peer_dynamo_replay.py"), "--trace", str(a.trace),
           "--num-gpu-blocks", str(a.blocks), "--host-blocks", str(a.blocks),
           "--block-size", "16", "--speedup", str(a.speedup),
           "--arrival-speedup", str(a.arrival_speedup), "--router-mode", "kv_router"]
    if prefill:
        cmd += ["--prefill-workers", str(prefill), "--decode-workers", str(workers),
                "--kv-transfer-bandwidth", "50", "--kv-transfer-bytes-per-token", "23040"]
    else:
        cmd += ["--workers", str(workers)]
    if a.limit:
        cmd += ["--max-requests", str(a.limit)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env={**os.environ, "DYN_LOG": "error"})
    s = json.loads(out.stdout.strip().splitlines()[-1])["summary"]
    return {"ttft_p50": s["median_ttft_ms"], "ttft_p99": s["p99_ttft_ms"],
            "itl_p50": s["median_itl_ms"], "itl_p99": s["p99_itl_ms"],
            "tpot_p50": s["median_tpot_ms"], "tpot_p99": s["p99_tpot_ms"],
            "req_s": s["request_throughput_rps"], "out_tok_s": s["output_throughput_tok_s"],
            "reuse": s["prefix_cache_reused_ratio"]}


def _fmt(key: str, v: float) -> str:
    if key == "reuse":
        return f"{v:.1%}"
    return f"{v:.2f}" if key == "req_s" else f"{v:,.1f}"


def report(a: argparse.Namespace, rows: dict[str, dict[str, Any]], argv: list[str]) -> str:
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    lines = ["# Disaggregation at scale (offline, Mooncake synthetic trace)", "",
             f"- **command**: `python bench/disagg_scale.py {' '.join(argv)}`",
             f"- **date**: {datetime.now(UTC).isoformat(timespec='seconds')}",
             f"- **commit**: {commit}",
             f"- **machine**: {platform.node()}, {os.cpu_count()} CPUs, Python "
             f"{platform.python_version()}; virtual time on both sides",
             f"- **trace**: {a.trace.name}, {a.limit or 'all'} requests; engine speedup "
             f"{a.speedup}, arrivals {a.arrival_speedup}x; {a.blocks} device + {a.blocks} "
             "host blocks per worker; "
             f"ours: prompts with >= {a.min_prefill} uncached tokens go to a prefill worker",
             "", "ms unless named. ITL: every token's gap; TPOT: each request's mean gap.", "",
             "| deployment | system | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | TPOT p50 | "
             "TPOT p99 | req/s | output tok/s | prefix reuse |",
             "|---|---|" + "---:|" * len(METRICS)]
    for name, *_ in SHAPES:
        for system in ("dynamo-bus", "Dynamo 1.6.1"):
            row = rows.get(f"{name} / {system}")
            if row is not None:
                lines.append(f"| {name} | {system} | "
                             + " | ".join(_fmt(k, row[k]) for k in METRICS) + " |")
    lines += ["", "Ratios (Dynamo / dynamo-bus; > 1: ours lower, i.e. better for latency):", "",
              "| deployment | TTFT p50 | TTFT p99 | ITL p99 | TPOT p99 |",
              "|---|---:|---:|---:|---:|"]
    for name, *_ in SHAPES:
        o, d = rows.get(f"{name} / dynamo-bus"), rows.get(f"{name} / Dynamo 1.6.1")
        if o and d:
            lines.append(f"| {name} | " + " | ".join(
                f"{d[k] / o[k]:.2f}" for k in ("ttft_p50", "ttft_p99", "itl_p99", "tpot_p99"))
                + " |")
    agg = rows.get(f"{SHAPES[0][0]} / dynamo-bus")
    if agg:
        lines += ["", "Disaggregated against aggregated, ours (aggregated / disaggregated; > 1: "
                  "disaggregation lowers it):", "",
                  "| deployment | ITL p99 | TPOT p99 | TTFT p99 |", "|---|---:|---:|---:|"]
        for name, *_ in SHAPES[1:]:
            o = rows.get(f"{name} / dynamo-bus")
            if o:
                lines.append(f"| {name} | {agg['itl_p99'] / o['itl_p99']:.2f} | "
                             f"{agg['tpot_p99'] / o['tpot_p99']:.2f} | "
                             f"{agg['ttft_p99'] / o['ttft_p99']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--blocks", type=int, default=16384)
    ap.add_argument("--speedup", type=float, default=2.0)
    ap.add_argument("--arrival-speedup", type=float, default=None,
                    help="divide the trace's arrival times by this (default: --speedup)")
    ap.add_argument("--min-prefill", type=int, default=1000)
    ap.add_argument("--no-dynamo", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT)
    argv = sys.argv[1:]
    a = ap.parse_args(argv)
    a.arrival_speedup = a.arrival_speedup or a.speedup
    rows: dict[str, dict[str, Any]] = {}
    for name, workers, prefill in SHAPES:
        rows[f"{name} / dynamo-bus"] = ours(a, workers, prefill)
        print(name, "ours", {k: round(v, 2) for k, v in rows[f"{name} / dynamo-bus"].items()},
              flush=True)
        if not a.no_dynamo:
            rows[f"{name} / Dynamo 1.6.1"] = dynamo(a, workers, prefill)
            print(name, "dynamo", {k: round(v, 2) for k, v in
                                   rows[f"{name} / Dynamo 1.6.1"].items()}, flush=True)
    text = report(a, rows, argv)
    a.out.with_suffix(".md").write_text(text + "\n")
    a.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
