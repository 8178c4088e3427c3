"""Serving-path overhead vs NVIDIA Dynamo 1.6.1.

Mock engine at speedup 1000, 4 workers, ~1,000-token prompts through the same tokenizer,
64 output tokens, concurrency 8 and 32, streaming and unary: req/s and TTFT p50/p99 for
dynamo-bus (all-in-one ``serve`` and the multi-process topology) and for Dynamo's
frontend + mocker, in the same run.  Systems run one at a time (never two loaded at
once), each started fresh per round, the order rotated per round; the table reports
medians over rounds.  Writes ``bench/results/serving_overhead.{md,json}``.

    .venv/bin/python bench/serving_overhead.py                       # every system
    .venv/bin/python bench/serving_overhead.py --systems dynamo --rounds 1
    .venv/bin/python bench/serving_overhead.py --quick   # the regression check, < 2 min

``--quick``: one round of 500 requests per cell, streaming and unary at c = 8 and 32,
Dynamo against ``serve`` with per-token streaming (``--fold-chunks false``, one SSE
event per token as Dynamo sends), written to ``serving_overhead_quick.{md,json}``. Run
it whenever the request path changes; the full run is for the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
import peer_dynamo as pd

ROOT = pd.ROOT
BUS = ROOT / ".venv" / "bin" / "dynamo-bus"
SYSTEMS = ("dynamo", "bus-serve", "bus-serve-per-token", "bus-serve-1proc", "bus-multi")
LABELS = {
    "dynamo": "NVIDIA Dynamo 1.6.1 (frontend + mocker, router kv)",
    "bus-serve": "dynamo-bus `serve`, one command: embedded nats-server, router and workers "
    "in one process, the HTTP frontend in a child process (the default)",
    "bus-serve-per-token": "dynamo-bus `serve --fold-chunks false`: one SSE event per token "
    "the engine produced, as Dynamo sends (no merging of chunks a slow reader left waiting)",
    "bus-serve-1proc": "dynamo-bus `serve --frontend-process false`: every role in one "
    "Python process",
    "bus-multi": "dynamo-bus multi-process (nats, workers, router, frontend: 4 processes)",
}


@dataclass
class Running:
    base_url: str
    model: str
    startup_s: float
    procs: list[pd.Proc]
    teardown: list[str] = field(default_factory=list)
    stop_s: float = 0.0

    def cpu_s(self) -> float:
        return pd.group_cpu_s([p.pid for p in self.procs])


async def _ready(base: str, procs: list[pd.Proc], timeout_s: float, model_name: str) -> str:
    await pd.wait_http(f"{base}/ready", timeout_s, procs)
    ids = await pd.wait_http(f"{base}/v1/models", 30, procs, want_model=True)
    return model_name if model_name in ids else ids[0]


def _check_loopback(procs: list[pd.Proc]) -> None:
    bad = pd.non_loopback_listeners([p.pid for p in procs])
    if bad:
        raise RuntimeError(f"listening beyond loopback: {bad}")


@contextlib.asynccontextmanager
async def start_system(
    name: str, a: argparse.Namespace, model_name: str, run_dir: Path
) -> AsyncIterator[Running]:
    t0 = time.monotonic()
    if name == "dynamo":
        async with pd.DynamoPeer(
            Path(a.model_dir),
            run_dir,
            num_workers=a.workers,
            speedup=a.speedup,
            router_mode=a.dynamo_router_mode,
            model_name=model_name,
        ) as peer:
            r = Running(peer.base_url, peer.model, peer.startup_s, peer.procs)
            yield r
        r.teardown, r.stop_s = peer.teardown_notes, peer.stop_s
        return
    bus = Path(a.bus_bin)  # existence checked in parse()
    mock = ["--engine", "mock", "--mock-speedup", f"{a.speedup:g}", "--model", str(a.model_dir)]
    procs: list[pd.Proc] = []
    # same log level as the Dynamo peer (DYN_LOG=warn): no per-request log lines
    env = dict(os.environ, TMPDIR=str(run_dir / "tmp"), DYNAMO_BUS_LOG_LEVEL="warning")
    extra = shlex.split(a.bus_args)
    (run_dir / "tmp").mkdir(parents=True, exist_ok=True)
    port = pd.free_port()
    base = f"http://{pd.LOOPBACK}:{port}"
    http = ["--http-host", pd.LOOPBACK, "--http-port", str(port)]

    def role(label: str, *argv: str) -> None:
        procs.append(pd.spawn(label, [str(bus), *argv, *extra], run_dir, env))

    try:
        if name in ("bus-serve", "bus-serve-per-token", "bus-serve-1proc"):
            store = ["--store-dir", str(run_dir / "nats-store")]
            one = {"bus-serve-1proc": ["--frontend-process", "false"],
                   "bus-serve-per-token": ["--fold-chunks", "false"]}.get(name, [])
            role(name, "serve", *mock, "--workers", str(a.workers), *store, *http, *one)
        elif name == "bus-multi":
            nport = pd.free_port()
            nats = ["--nats-url", f"nats://{pd.LOOPBACK}:{nport}"]
            procs.append(pd.spawn("bus-nats", [str(bus), "nats", "--port", str(nport),
                                               "--store-dir", str(run_dir / "nats-store")],
                                  run_dir, env))  # fmt: skip
            await pd.wait_tcp(pd.LOOPBACK, nport, 30, procs)
            # One process runs all the workers, as Dynamo's mocker does (--num-workers).
            role("bus-workers", "worker", *mock, "--workers", str(a.workers), *nats)
            role("bus-router", "router", *nats)
            role("bus-frontend", "frontend", "--model", str(a.model_dir), *nats, *http)
        else:
            raise ValueError(f"unknown system {name!r}; choose from {SYSTEMS}")
        model = await _ready(base, procs, a.ready_timeout_s, model_name)
        _check_loopback(procs)
    except BaseException:
        await asyncio.to_thread(pd.stop, procs)
        raise
    r = Running(base, model, time.monotonic() - t0, procs)
    try:
        yield r
    finally:
        t1 = time.monotonic()
        r.teardown = await asyncio.to_thread(pd.stop, procs)
        r.stop_s = time.monotonic() - t1


def configs(a: argparse.Namespace) -> list[tuple[int, bool]]:
    return [(c, m == "stream") for c in a.concurrency for m in a.modes]


async def run_system(
    name: str,
    rnd: int,
    a: argparse.Namespace,
    model_name: str,
    pools: dict,
    warm: dict,
    run_root: Path,
) -> dict:
    t0 = time.monotonic()
    out: dict = {"system": name, "round": rnd, "results": []}
    sysm: Running | None = None
    try:
        async with start_system(name, a, model_name, run_root / f"r{rnd}-{name}") as sysm:
            out["startup_s"] = sysm.startup_s
            for conc, stream in configs(a):
                res = await loadgen.run_load(
                    sysm.base_url,
                    sysm.model,
                    pools[(conc, stream)],
                    conc,
                    a.requests,
                    a.max_tokens,
                    stream,
                    warmup_prompts=warm[(conc, stream)],
                    cap_s=a.cap_s,
                    cpu_probe=sysm.cpu_s,
                    machine_busy_s=loadgen.machine_busy_s,
                )
                d = res.as_dict()
                out["results"].append(d)
                ttft = (
                    f" TTFT p50/p99 {d['ttft_p50_ms']:.1f}/{d['ttft_p99_ms']:.1f} ms"
                    if d["ttft_p50_ms"] is not None
                    else ""
                )
                print(
                    f"  r{rnd} {name:9s} c={conc:<3d} {'stream' if stream else 'unary ':6s} "
                    f"{d['req_per_s']:7.1f} req/s{ttft}  E2E p50 {d['e2e_p50_ms'] or 0:.1f} ms"
                    f"  err {d['errors']}  cpu lg/srv/other {d['loadgen_cpu_cores']:.2f}/"
                    f"{d['server_cpu_cores'] or 0:.2f}/{d['other_cpu_cores'] or 0:.2f}",
                    flush=True,
                )
    except Exception as e:
        out["failure"] = f"{type(e).__name__}: {e}"[:2000]
        print(f"  r{rnd} {name}: FAILED {out['failure'][:500]}", flush=True)
    out["pass_s"] = time.monotonic() - t0
    if sysm is not None:
        out["stop_s"], out["teardown"] = sysm.stop_s, sysm.teardown
        for note in sysm.teardown:
            print(f"  r{rnd} {name}: teardown: {note}", flush=True)
    return out


def _med(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(runs: list[dict], a: argparse.Namespace) -> list[dict]:
    rows = []
    for name in a.systems:
        mine = [r for r in runs if r["system"] == name]
        for conc, stream in configs(a):
            rs = [
                x
                for r in mine
                for x in r["results"]
                if x["concurrency"] == conc and x["stream"] == stream
            ]
            row = {
                "system": name,
                "concurrency": conc,
                "stream": stream,
                "rounds": len(rs),
                "errors": sum(x["errors"] for x in rs),
                "error_samples": [s for x in rs for s in x["error_samples"]][:3],
            }
            for k in (
                "req_per_s",
                "ttft_p50_ms",
                "ttft_p99_ms",
                "e2e_p50_ms",
                "e2e_p99_ms",
                "out_tok_per_s",
                "loadgen_cpu_cores",
                "server_cpu_cores",
                "other_cpu_cores",
                "mean_out_tokens",
                "mean_prompt_tokens",
                "mean_content_events",
            ):
                row[k] = _med([x.get(k) for x in rs])
            row["req_per_s_all"] = [round(x["req_per_s"], 1) for x in rs]
            rows.append(row)
    return rows


def machine() -> dict:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kb = int(
        next(
            ln.split()[1]
            for ln in Path("/proc/meminfo").read_text().splitlines()
            if ln.startswith("MemTotal")
        )
    )
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return {
        "nproc": nproc,
        "cpu": cpu,
        "ram_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def v(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "not installed"

    git = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True
    ).stdout.strip()
    nats = subprocess.run(
        [str(pd.NATS_SERVER), "--version"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "dynamo-bus": f"{v('dynamo-bus')} (git {git or '?'})",
        "peer": pd.peer_version(),
        "nats-server": nats,
        "aiohttp (loadgen)": v("aiohttp"),
        "tokenizers": v("tokenizers"),
    }


def _f(x: float | None, nd: int = 1) -> str:
    return "—" if x is None else f"{x:,.{nd}f}"


def ratios(rows: list[dict]) -> list[str]:
    """dynamo-bus against Dynamo, cell by cell: req/s ratio and TTFT p50 side by side."""
    peer = {(r["concurrency"], r["stream"]): r for r in rows if r["system"] == "dynamo"}
    mine = [r for r in rows if r["system"] != "dynamo"
            and peer.get((r["concurrency"], r["stream"]), {}).get("req_per_s")]
    if not mine:
        return []
    out = ["", "dynamo-bus against Dynamo in the same run (req/s ÷ Dynamo's; TTFT p50 ms, "
           "ours / Dynamo's):", "",
           "| system | mode | conc | req/s ÷ Dynamo | TTFT p50 ours / Dynamo |",
           "|---|---|---:|---:|---:|"]
    for r in mine:
        d = peer[(r["concurrency"], r["stream"])]
        ttft = (f"{_f(r['ttft_p50_ms'])} / {_f(d['ttft_p50_ms'])}"
                if r["ttft_p50_ms"] is not None else "—")
        ratio = (r["req_per_s"] or 0) / d["req_per_s"]
        out.append(f"| {r['system']} | {'stream' if r['stream'] else 'unary'} | "
                   f"{r['concurrency']} | {ratio:.2f}x | {ttft} |")
    return out


def write_report(
    a: argparse.Namespace,
    runs: list[dict],
    rows: list[dict],
    meta: dict,
) -> tuple[Path, Path]:
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{a.out_name}.md", out_dir / f"{a.out_name}.json"
    js.write_text(json.dumps({"meta": meta, "summary": rows, "runs": runs}, indent=1))
    L = [
        "# Serving-path overhead vs NVIDIA Dynamo 1.6.1",
        "",
        f"Mock engine at speedup {a.speedup:g}, {a.workers} workers, "
        f"{a.prompt_tokens}-token prompts (chat-templated, same tokenizer, distinct per "
        f"request), {a.max_tokens} output tokens, {a.requests} measured requests per cell "
        f"after 2xC warm-up, medians over {meta['rounds_done']} round(s) "
        f"(each system started fresh per round, one system at a time, order rotated). "
        f"Measured at {meta['versions']['dynamo-bus']}, {meta['date']}.",
        "",
        "| system | mode | conc | req/s | TTFT p50 ms | TTFT p99 ms | E2E p50 ms | "
        "E2E p99 ms | out tok/s | text events / req | errors | loadgen CPU (cores) | "
        "server CPU (cores) | other CPU (cores) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        L.append(
            f"| {r['system']} | {'stream' if r['stream'] else 'unary'} | "
            f"{r['concurrency']} | {_f(r['req_per_s'])} | {_f(r['ttft_p50_ms'])} | "
            f"{_f(r['ttft_p99_ms'])} | {_f(r['e2e_p50_ms'])} | {_f(r['e2e_p99_ms'])} | "
            f"{_f(r['out_tok_per_s'], 0)} | {_f(r.get('mean_content_events'))} | "
            f"{r['errors']} | "
            f"{_f(r['loadgen_cpu_cores'], 2)} | {_f(r['server_cpu_cores'], 2)} | "
            f"{_f(r['other_cpu_cores'], 2)} |"
        )
    L += ratios(rows)
    odd = [
        f"{r['system']} {'stream' if r['stream'] else 'unary'} c={r['concurrency']}: "
        f"{_f(r['mean_out_tokens'])} output / {_f(r['mean_prompt_tokens'])} prompt tokens"
        for r in rows
        if r["rounds"]
        and (
            r["mean_out_tokens"] is None
            or abs(r["mean_out_tokens"] - a.max_tokens) > 0.5
            or r["mean_prompt_tokens"] is None
            or abs(r["mean_prompt_tokens"] - a.prompt_tokens) > 0.05 * a.prompt_tokens
        )
    ]
    L += [
        "",
        "Token counts (server-reported usage, mean per request): "
        + (
            "; ".join(odd)
            if odd
            else f"every cell {a.max_tokens} output and "
            f"{a.prompt_tokens} ±5% prompt tokens, as intended."
        ),
    ]
    L += [
        "",
        "Per-round req/s: "
        + "; ".join(
            f"{r['system']} {'s' if r['stream'] else 'u'}{r['concurrency']} {r['req_per_s_all']}"
            for r in rows
        ),
        "",
    ]
    L += [
        "| system | startup s | stop s | one pass s (start, 4 cells, stop) | failures / "
        "teardown notes |",
        "|---|---:|---:|---:|---|",
    ]
    for name in a.systems:
        mine = [r for r in runs if r["system"] == name]
        notes = [r["failure"][:200] for r in mine if "failure" in r]
        notes += sorted({n for r in mine for n in r.get("teardown", [])})
        notes = [n.replace("|", "/").replace("\n", " ") for n in notes]
        L.append(
            f"| {name} | {_f(_med([r.get('startup_s') for r in mine]))} | "
            f"{_f(_med([r.get('stop_s') for r in mine]))} | "
            f"{_f(_med([r['pass_s'] for r in mine]))} | {'; '.join(notes) or '—'} |"
        )
    L.append("(medians over rounds)")
    L += [
        "",
        "Systems:",
        *[f"- `{s}`: {LABELS[s]}" for s in a.systems],
        "",
        "TTFT = time to the first SSE chunk carrying content (streaming only). req/s = "
        "completed requests / wall time of the measured phase. CPU columns = CPU seconds "
        "/ wall seconds over the measured phase (loadgen: this process, via getrusage; "
        "server: every process of the system, nats-server included, via /proc; other: "
        "the rest of the machine's busy time from /proc/stat, i.e. unrelated load that "
        f"competes with the run). {os.cpu_count()} cores in all: when the three add up to "
        "about that, the box is saturated.",
        "",
        "## Run",
        "",
        "```",
        meta["command"],
        "```",
        "",
        f"- date: {meta['date']}; total wall {meta['total_s']:.0f} s",
        f"- machine: nproc {meta['machine']['nproc']}, {meta['machine']['cpu']}, "
        f"{meta['machine']['ram_gib']} GiB RAM, kernel {meta['machine']['kernel']}, "
        f"Python {meta['machine']['python']}, load average at start "
        f"{meta['machine']['loadavg_at_start']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- model dir: `{meta['model_dir']}` (served as `{meta['model_name']}`)",
        "",
    ]
    md.write_text("\n".join(L))
    return md, js


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
    )
    ap.add_argument("--requests", type=int, default=400, help="measured requests per cell")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model-dir", help="default: dynamo_bus.models.modeldir.resolve_model(None)")
    ap.add_argument("--concurrency", default="8,32", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--modes", default="stream,unary", type=lambda s: s.split(","))
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--speedup", type=float, default=1000.0)
    ap.add_argument("--dynamo-router-mode", default="kv")
    ap.add_argument("--cap-s", type=float, default=60.0, help="wall cap per load phase")
    ap.add_argument(
        "--budget-s", type=float, default=540.0, help="start no new round after this many seconds"
    )
    ap.add_argument(
        "--bus-args",
        default="",
        help="extra arguments for every dynamo-bus role except nats, e.g. '--router-mode X'",
    )
    ap.add_argument("--bus-bin", default=str(BUS), help="the dynamo-bus console script")
    ap.add_argument("--ready-timeout-s", type=float, default=120.0)
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--out-name", default="serving_overhead")
    ap.add_argument("--quick", action="store_true",
                    help="the regression check: 1 round, 500 requests, c=8,32, dynamo and "
                    "bus-serve-per-token (each also settable), written to *_quick")
    a = ap.parse_args(argv)
    if a.quick:
        given = set(argv if argv is not None else sys.argv[1:])
        for flag, attr, value in (("--rounds", "rounds", 1), ("--requests", "requests", 500),
                                  ("--systems", "systems", ["dynamo", "bus-serve-per-token"]),
                                  ("--out-name", "out_name", "serving_overhead_quick")):
            if not any(g == flag or g.startswith(flag + "=") for g in given):
                setattr(a, attr, value)
    bad = [s for s in a.systems if s not in SYSTEMS]
    if bad:
        ap.error(f"unknown systems {bad}; choose from {SYSTEMS}")
    if any(s.startswith("bus-") for s in a.systems) and not Path(a.bus_bin).exists():
        ap.error(f"{a.bus_bin} missing: pip install -e {ROOT} (or pass --systems dynamo)")
    if "dynamo" in a.systems and not pd.PEER_PY.exists():
        ap.error(f"{pd.PEER_PY} missing: run bench/setup_dynamo_peer.sh")
    args = sys.argv[1:] if argv is None else argv
    a.command = f"cd {shlex.quote(os.getcwd())} && " + shlex.join(
        [os.path.abspath(sys.executable), sys.argv[0], *args]
    )
    return a


async def amain(a: argparse.Namespace) -> int:
    t_start = time.monotonic()
    meta = {
        "command": a.command,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "versions": versions(),
    }
    if a.model_dir is None:
        sys.path.insert(0, str(ROOT))
        from dynamo_bus.models.modeldir import resolve_model

        md = resolve_model(None)
        a.model_dir, model_name = str(md.path), md.name
    else:
        try:
            sys.path.insert(0, str(ROOT))
            from dynamo_bus.models.modeldir import resolve_model

            model_name = resolve_model(a.model_dir).name
        except Exception:
            model_name = Path(a.model_dir).name
    meta.update(model_dir=a.model_dir, model_name=model_name)
    # Same prompts for every system; distinct per cell (a running server keeps its prefix
    # cache between cells) and reused across rounds (every round starts servers fresh).
    cells = configs(a)
    n_warm = [2 * c for c, _ in cells]
    allp = loadgen.build_prompts(
        a.model_dir, len(cells) * a.requests + sum(n_warm), a.prompt_tokens, seed=7
    )
    pools, warm, i = {}, {}, 0
    for (c, s), nw in zip(cells, n_warm, strict=True):
        pools[(c, s)] = allp[i : i + a.requests]
        warm[(c, s)] = allp[i + a.requests : i + a.requests + nw]
        i += a.requests + nw
    print(
        f"{len(allp)} prompts of {a.prompt_tokens} templated tokens ready "
        f"({time.monotonic() - t_start:.1f}s)",
        flush=True,
    )
    run_root = ROOT / "bench" / ".runs" / f"serving-{int(time.time())}"
    runs: list[dict] = []
    rounds_done = 0
    for rnd in range(a.rounds):
        elapsed = time.monotonic() - t_start
        if rnd and elapsed + elapsed / rnd > a.budget_s:
            print(f"budget: stopping after {rnd} round(s) ({elapsed:.0f}s)", flush=True)
            break
        order = a.systems[rnd % len(a.systems) :] + a.systems[: rnd % len(a.systems)]
        for name in order:
            runs.append(await run_system(name, rnd, a, model_name, pools, warm, run_root))
        rounds_done += 1
    meta.update(rounds_done=rounds_done, total_s=time.monotonic() - t_start, run_dir=str(run_root))
    rows = summarize(runs, a)
    md, js = write_report(a, runs, rows, meta)
    print(md.read_text())
    print(f"wrote {md} and {js}; logs under {run_root}")
    return 1 if any("failure" in r for r in runs) else 0


def main() -> None:
    sys.exit(asyncio.run(amain(parse())))


if __name__ == "__main__":
    main()
