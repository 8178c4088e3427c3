#!/usr/bin/env python3
"""Replay the Mooncake synthetic trace against `dynamo-bus serve --engine mock` with NVIDIA's
aiperf (an independent load generator, from the .peers/aiperf venv that
bench/setup_aiperf_peer.sh makes).

Steps: take the first ``--requests`` rows of the trace (optionally only rows with
input+output <= ``--max-total``), rebase their timestamps to 0 and divide them by
``--time-scale``, write that copy under bench/.runs/; start ``dynamo-bus serve --engine mock``
on a free 127.0.0.1 port; wait for /v1/models; run ``aiperf profile --custom-dataset-type
mooncake_trace --fixed-schedule`` (each request sent at its trace timestamp, streaming, the
SmolLM2 tokenizer, offline); stop serve (by the PIDs of the process group this script made)
in a finally block; write aiperf's summary to bench/results/aiperf_trace.md.

Context length: serve takes it from the model directory's config.json
(max_position_embeddings: 8192 for SmolLM2) and refuses longer prompts (413
context_length_exceeded; 400 when prompt + max_tokens exceeds it). The trace's prompts
average 15k tokens (max 191k), so by default the mock is served with serve's
``--context-length`` raised to ``--context-length`` here: the mock computes nothing, so
only the limit changes. ``--context-length 0`` keeps the model's 8192; then pass e.g.
``--max-total 8100`` to keep only the rows that fit (the chat template adds ~30 tokens).

    bash bench/setup_aiperf_peer.sh
    .venv/bin/python bench/aiperf_trace.py [--requests 200] [--time-scale 1]

Artifacts: bench/.runs/aiperf_trace-<time>/ (git-ignored). Result: bench/results/aiperf_trace.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
import peer_dynamo as pd

ROOT = Path(__file__).resolve().parent.parent
AIPERF = ROOT / ".peers" / "aiperf" / "bin" / "aiperf"
DYNAMO_BUS = ROOT / ".venv" / "bin" / "dynamo-bus"
TRACE = Path("/work/shared/traces/synthetic_trace.jsonl")
MODEL = Path.home() / ".cache" / "dynamo-bus" / "models" / "SmolLM2-135M-Instruct"
RESULTS = ROOT / "bench" / "results"

# (aiperf metric tag, label) for the summary table, in aiperf's console order.
METRICS = [
    ("time_to_first_token", "Time to first token"),
    ("time_to_second_token", "Time to second token"),
    ("inter_token_latency", "Inter-token latency"),
    ("request_latency", "Request latency"),
    ("input_sequence_length", "Input sequence length"),
    ("output_sequence_length", "Output sequence length"),
    ("output_token_throughput_per_user", "Output token throughput per user"),
    ("output_token_throughput", "Output token throughput"),
    ("request_throughput", "Request throughput"),
    ("input_token_throughput", "Input token throughput"),
    ("request_count", "Request count"),
    ("error_request_count", "Error request count"),
    ("request_error_rate", "Request error rate"),
    ("benchmark_duration", "Benchmark duration"),
]
STATS = ["avg", "min", "max", "p50", "p90", "p99", "std"]


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", type=Path, default=TRACE)
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--requests", type=int, default=200, help="first N (kept) trace rows")
    p.add_argument("--max-total", type=int, default=0,
                   help="keep only rows with input+output <= this (0: keep all)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="divide trace timestamps by this (2: twice as fast)")
    p.add_argument("--context-length", type=int, default=262144,
                   help="serve the mock with this context length (0: the model's own)")
    p.add_argument("--endpoint-type", default="chat", choices=["chat", "completions"])
    p.add_argument("--mock-speedup", type=float, default=100.0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--serve-arg", action="append", default=[],
                   help="extra `dynamo-bus serve` argument (repeatable, e.g. --serve-arg=--"
                        "num-blocks=32768)")
    p.add_argument("--client-token-count", action="store_true",
                   help="count tokens with aiperf's tokenizer, not the server's usage")
    p.add_argument("--aiperf-workers", type=int, default=4)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--cap-s", type=float, default=300.0, help="kill aiperf after this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "aiperf_trace.md")
    return p.parse_args()


def subset_trace(a: argparse.Namespace, dest: Path) -> dict[str, float]:
    """Write the first ``a.requests`` kept rows, timestamps rebased and scaled."""
    rows = []
    with a.trace.open() as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            if a.max_total and r["input_length"] + r["output_length"] > a.max_total:
                continue
            rows.append(r)
            if len(rows) == a.requests:
                break
    if not rows:
        raise SystemExit("no trace rows left after filtering")
    t0 = rows[0]["timestamp"]
    with dest.open("w") as f:
        for r in rows:
            r["timestamp"] = round((r["timestamp"] - t0) / a.time_scale)
            f.write(json.dumps(r) + "\n")
    isl = [r["input_length"] for r in rows]
    return {"rows": len(rows), "span_s": rows[-1]["timestamp"] / 1000,
            "isl_mean": sum(isl) / len(isl), "isl_max": max(isl),
            "osl_mean": sum(r["output_length"] for r in rows) / len(rows),
            "total_max": max(r["input_length"] + r["output_length"] for r in rows)}


def hf_cache_entry(src: Path, cache: Path, repo_id: str) -> None:
    """Expose the local tokenizer files as the hub-cache snapshot of ``repo_id``.

    aiperf 0.13.0 in HF offline mode resolves --tokenizer with
    ``snapshot_download(name, local_files_only=True)`` (its parallel prompt decoders always
    force offline mode), which rejects a local directory (HFValidationError: not a repo
    id). A cache entry of symlinks lets it load ``repo_id`` fully offline.
    """
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in src.iterdir():
        if f.is_file() and f.suffix == ".json":
            (snap / f.name).symlink_to(f.resolve())


def wait_models(base: str, proc: pd.Proc, timeout_s: float = 90.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"serve exited early:\n{proc.tail()}")
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(f"{base}/v1/models", timeout=2) as r:
                return json.load(r)["data"][0]["id"]
        time.sleep(0.5)
    raise RuntimeError(f"serve not ready in {timeout_s:.0f}s:\n{proc.tail()}")


def stop_serve(serve: pd.Proc, grace_s: float = 40.0) -> list[str]:
    """SIGTERM the serve process by its PID (it stops its frontend child and nats-server
    itself; signalling its whole group would hand the frontend a second signal), then let
    pd.stop SIGKILL whatever of its group and descendants is left."""
    notes: list[str] = []
    if serve.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(serve.pid, signal.SIGTERM)
        try:
            serve.popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            notes.append(f"serve (pid {serve.pid}) still running {grace_s:.0f}s after SIGTERM")
    return notes + pd.stop([serve], grace_s=5.0)


def run_aiperf(argv: list[str], env: dict[str, str], log: Path, cap_s: float) -> int:
    """Run aiperf in a session of its own; on timeout, kill that process group only."""
    with log.open("wb") as out:
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            return p.wait(timeout=cap_s)
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGINT, 15), (signal.SIGKILL, 5)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=grace)
                    break
            return 124


def machine() -> str:
    return f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {loadgen.cpu_model()}"


def aiperf_version() -> str:
    py = AIPERF.parent / "python"
    return subprocess.run([str(py), "-c", "import importlib.metadata as m;"
                           "print(m.version('aiperf'))"],
                          capture_output=True, text=True).stdout.strip() or "?"


def fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:,.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return "" if v is None else str(v)


def summary_table(export: Path) -> tuple[str, dict]:
    data = json.loads(export.read_text())
    lines = ["| Metric | unit | " + " | ".join(STATS) + " |",
             "|---|---|" + "---:|" * len(STATS)]
    for tag, label in METRICS:
        m = data.get(tag)
        if not isinstance(m, dict):
            continue
        lines.append(f"| {label} | {m.get('unit', '')} | "
                     + " | ".join(fmt(m.get(s)) for s in STATS) + " |")
    return "\n".join(lines), data


def main() -> int:
    a = _args()
    if not AIPERF.is_file():
        raise SystemExit(f"{AIPERF} missing: run bash bench/setup_aiperf_peer.sh")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = ROOT / "bench" / ".runs" / f"aiperf_trace-{stamp}"
    run_dir.mkdir(parents=True)
    trace = run_dir / "trace_subset.jsonl"
    sub = subset_trace(a, trace)
    print(f"trace subset: {sub}", flush=True)

    hf_cache = run_dir / "hf-cache"
    tokenizer = f"dynamo-bus-local/{a.model.name}"
    hf_cache_entry(a.model, hf_cache, tokenizer)
    port = pd.free_port()
    base = f"http://{pd.LOOPBACK}:{port}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TMPDIR=str(run_dir / "tmp"))
    (run_dir / "tmp").mkdir()
    serve_argv = [str(DYNAMO_BUS), "serve", "--engine", "mock",
                  "--mock-speedup", str(a.mock_speedup), "--workers", str(a.workers),
                  "--http-host", pd.LOOPBACK, "--http-port", str(port),
                  "--store-dir", str(run_dir / "nats-store"), "--model", str(a.model),
                  "--context-length", str(a.context_length),
                  "--served-model-name", a.model.name, "--log-level", "warning",
                  *a.serve_arg]
    aiperf_argv = [
        str(AIPERF), "profile",
        "--model", a.model.name, "--url", base,
        "--endpoint-type", a.endpoint_type, "--streaming",
        "--tokenizer", tokenizer,
        "--input-file", str(trace), "--custom-dataset-type", "mooncake_trace",
        "--fixed-schedule", "--fixed-schedule-auto-offset",
        "--request-count", str(sub["rows"]),
        "--request-timeout-seconds", str(a.request_timeout),
        "--random-seed", str(a.seed),
        "--workers-max", str(a.aiperf_workers),
        "--artifact-dir", str(run_dir / "aiperf"),
        "--ui-type", "none", "--no-gpu-telemetry", "--no-server-metrics",
    ]
    if not a.client_token_count:
        # The mock streams random token ids: re-tokenizing their text miscounts them, so
        # ISL/OSL (and ITL, per output token) use the server's usage counts.
        aiperf_argv.append("--use-server-token-count")
    serve: pd.Proc | None = None
    notes: list[str] = []
    rc = -1
    t0 = time.monotonic()
    try:
        serve = pd.spawn("serve", serve_argv, run_dir, env=env)
        model = wait_models(base, serve)
        print(f"serve ready on {base} (model {model}) in {time.monotonic() - t0:.1f}s",
              flush=True)
        # aiperf's ZMQ IPC sockets live under TMPDIR, and a socket path may not exceed
        # 107 bytes: give it a short directory of its own.
        with tempfile.TemporaryDirectory(prefix="aiperf-") as tmp:
            aiperf_env = dict(env, TMPDIR=tmp, HF_HUB_CACHE=str(hf_cache))
            rc = run_aiperf(aiperf_argv, aiperf_env, run_dir / "aiperf.log", a.cap_s)
        if not serve.alive():
            notes.append(f"serve died during the run:\n{serve.tail()}")
    finally:
        if serve is not None:
            notes += stop_serve(serve)
            shutil.rmtree(run_dir / "nats-store", ignore_errors=True)  # JetStream scratch
    wall = time.monotonic() - t0
    print(f"aiperf rc={rc} in {wall:.0f}s; log {run_dir / 'aiperf.log'}", flush=True)
    exports = sorted((run_dir / "aiperf").rglob("profile_export_aiperf.json"))
    if not exports:
        print((run_dir / "aiperf.log").read_text(errors="replace")[-4000:])
        raise SystemExit("aiperf wrote no profile_export_aiperf.json")
    table, data = summary_table(exports[-1])
    errors = data.get("error_summary") or []

    cmd = "HF_HUB_OFFLINE=1 " + shlex.join(
        [".venv/bin/python", "bench/aiperf_trace.py", *sys.argv[1:]])
    rel = str(ROOT)
    md = [
        "# aiperf Mooncake trace replay against dynamo-bus (mock engine)",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"- machine: {machine()}; Python {platform.python_version()}",
        f"- aiperf {aiperf_version()} (.peers/aiperf, bench/setup_aiperf_peer.sh)",
        f"- command: `{cmd}`",
        f"- trace: {a.trace} — first {sub['rows']} rows"
        + (f" with input+output <= {a.max_total}" if a.max_total else "")
        + f", timestamps rebased to 0 and divided by {a.time_scale:g}: span "
          f"{sub['span_s']:.1f}s, input mean {sub['isl_mean']:,.0f} / max "
          f"{sub['isl_max']:,} tokens, output mean {sub['osl_mean']:.1f}",
        f"- server: `{shlex.join(serve_argv).replace(rel + '/', '')}`",
        "- context length: "
        + (f"{a.context_length} (serve --context-length; SmolLM2's own is 8192)"
           if a.context_length else "the model's own"),
        f"- aiperf: `{shlex.join(aiperf_argv).replace(rel + '/', '')}`",
        f"- aiperf exit code {rc}; wall time (serve start to stop) {wall:.0f}s; artifacts "
        f"{run_dir.relative_to(ROOT)}/ (git-ignored)",
        "- prompts: aiperf (mooncake_trace loader, block size 512) maps each hash_id to one "
        "block of 512 tokens (the tokenizer's BOS, then a window of its tokenized Shakespeare "
        "corpus at an offset drawn from an RNG seeded by (seed, trace file, hash_id)), so "
        "equal hash_ids give equal blocks (shared prefixes); "
        "the last block is cut to make exactly input_length tokens, and max_tokens is "
        "output_length. Token counts below are the server's usage (--use-server-token-count), "
        "so ISL includes the chat template (~30 tokens).",
        "",
        table,
        "",
    ]
    if errors:
        by_code: dict[str, list] = {}
        for e in errors:
            d = e.get("error_details") or {}
            key = f"{d.get('code')} {d.get('type')}"
            by_code.setdefault(key, [0, str(d.get("message", ""))[:300]])[0] += e["count"]
        md += ["Errors (by HTTP status; one example message each):", ""]
        md += [f"- {key}: {n} requests, e.g. `{msg}`" for key, (n, msg) in by_code.items()]
        md.append("")
    if notes:
        md += ["Notes:", "", *[f"- {n}" for n in notes], ""]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(md))
    print("\n".join(md))
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
