"""The Mooncake trace replayed live through `dynamo-bus serve` (mock engines) next to the
offline simulation of the same cluster: how far the simulator's what-if figures are
from the running system.

Live: `dynamo-bus serve --engine mock` with N workers on 127.0.0.1 (router kv_aware),
`dynamo-bus replay` sends the trace's requests at their timestamps / speedup, prompts as
token ids synthesized from hash_ids. Offline: `dynamo-bus simulate` with the same
workers, blocks, engine and arrival speedups. Both write their own report; this script
writes bench/results/replay_vs_sim.md with the two summaries side by side.

    python bench/replay_vs_sim.py --speedup 2 [--limit N] [--workers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import peer_dynamo as pd  # noqa: E402
from aiperf_trace import stop_serve, wait_models  # noqa: E402

TRACE = ROOT.parent / "shared" / "traces" / "synthetic_trace.jsonl"
BIN = Path(sys.executable).parent / "dynamo-bus"
RESULTS = ROOT / "bench" / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--num-blocks", type=int, default=16384)
    ap.add_argument("--speedup", type=float, default=2.0,
                    help="arrivals and the mock engines both this much faster")
    ap.add_argument("--limit", type=int, default=None)
    a = ap.parse_args()
    run = ROOT / "bench" / ".runs" / f"replay_vs_sim-{time.strftime('%Y%m%d-%H%M%S')}"
    run.mkdir(parents=True)
    limit = ["--limit", str(a.limit)] if a.limit else []
    port = pd.free_port()
    base = f"http://{pd.LOOPBACK}:{port}"
    serve_argv = [str(BIN), "serve", "--engine", "mock", "--mock-speedup", str(a.speedup),
                  "--workers", str(a.workers), "--num-blocks", str(a.num_blocks),
                  "--max-concurrency", "256", "--context-length", "262144",
                  "--http-host", pd.LOOPBACK, "--http-port", str(port),
                  "--store-dir", str(run / "nats-store"), "--log-level", "warning"]
    replay_argv = [str(BIN), "replay", str(a.trace), "--url", f"{base}/v1", "--speedup",
                   str(a.speedup), "--timeout", "600", "--out", str(run / "live"), *limit]
    sim_argv = [str(BIN), "simulate", str(a.trace), "--workers", str(a.workers),
                "--num-blocks", str(a.num_blocks), "--engine-speedup", str(a.speedup),
                "--speedup", str(a.speedup), "--out", str(run / "sim"), *limit]
    serve = pd.spawn("serve", serve_argv, run, env=dict(os.environ))
    try:
        wait_models(base, serve)
        subprocess.run(replay_argv, check=True, timeout=3600)
    finally:
        stop_serve(serve)
    subprocess.run(sim_argv, check=True, timeout=3600)
    live = json.loads((run / "live.json").read_text())["summary"]
    sim = json.loads((run / "sim.json").read_text())["summary"]

    def cells(s: dict) -> str:
        t, e = s["ttft_ms"], s["e2e_ms"]
        return (f"{s['completed']:,} / {s['errors']} | {s['prefix_hit_rate']:.3f} | "
                f"{t['mean']:,.0f} / {t['p50']:,.0f} / {t['p99']:,.0f} | "
                f"{e['mean']:,.0f} / {e['p50']:,.0f} / {e['p99']:,.0f} | "
                f"{s['output_tokens_per_s']:,.0f}")

    lines = [
        "# Live replay through serve vs offline simulation", "",
        f"Command: `python bench/replay_vs_sim.py --speedup {a.speedup:g} --workers "
        f"{a.workers}{' --limit ' + str(a.limit) if a.limit else ''}` · "
        f"{datetime.now():%Y-%m-%d %H:%M} · {platform.machine()}, {os.cpu_count()} cores "
        "(shared; the client, frontend, router, workers and nats-server all on them).", "",
        f"Trace `{a.trace.name}`, arrivals and mock engines {a.speedup:g}x faster; "
        f"{a.workers} workers x {a.num_blocks:,} blocks of 16, router `kv_aware`.", "",
        f"- live: `{' '.join(serve_argv[1:])}` then `{' '.join(replay_argv[1:])}`",
        f"- offline: `{' '.join(sim_argv[1:])}`", "",
        "| | completed / errors | prefix hit rate | TTFT mean / p50 / p99 ms | "
        "E2E mean / p50 / p99 ms | output tok/s |", "|---|---|---|---|---|---|",
        f"| live `replay` | {cells(live)} |", f"| offline `simulate` | {cells(sim)} |", ""]
    (RESULTS / "replay_vs_sim.md").write_text("\n".join(lines))
    for name in ("live", "sim"):
        for ext in ("md", "png"):
            (RESULTS / f"replay_vs_sim_{name}.{ext}").write_bytes(
                (run / f"{name}.{ext}").read_bytes())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
