"""Disaggregated serving on the reference engine (CPU, SmolLM2), each figure against
its baseline in the same run, every worker its own ``dynamo-bus worker`` process on
127.0.0.1 (one embedded nats-server, one router in this process):

* **affinity**: multi-turn sessions (each turn's prompt is the previous prompt, its
  answer and a new message) on 1 prefill + 2 decode workers, every turn prefilled
  remotely (``--disagg-min-prefill-tokens 0``): the router naming the decode worker
  that holds the session (``--disagg-affinity true``) against plain competing consumers
  on the shared subject (``false``). Bytes READ over NIXL by the decode workers, and
  TTFT of the turns after the first.
* **aggregated vs disaggregated**: a mixed load, half long prompts with short answers
  and half short prompts with long answers, at fixed concurrency, on 2 aggregated
  workers against 1 prefill + 1 decode worker (Dynamo's default threshold: prompts
  with 1,000 uncached tokens or more go to the prefill worker). TTFT, ITL (each
  request's mean gap between tokens) p50/p99, throughput. Two cores for two engines:
  this shows the mechanics and the interference they remove, not GPU numbers.

    python bench/disagg_reference.py                 # both parts
    python bench/disagg_reference.py --parts affinity --sessions 4

Writes bench/results/disagg_reference.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dynamo_bus.bus.connection import open_bus  # noqa: E402
from dynamo_bus.bus.messages import LOAD, Request, SamplingOptions  # noqa: E402
from dynamo_bus.bus.natsserver import EmbeddedNats  # noqa: E402
from dynamo_bus.bus.registry import Registry  # noqa: E402
from dynamo_bus.config import Config  # noqa: E402
from dynamo_bus.models.modeldir import resolve_model  # noqa: E402
from dynamo_bus.routing.router import Router  # noqa: E402
from dynamo_bus.serving.requester import Requester, new_request_id  # noqa: E402
from dynamo_bus.traces.report import percentile  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
OUT = ROOT / "bench" / "results"


class Deployment:
    """An embedded nats-server, worker processes, a router and a requester here."""

    def __init__(self, store: Path, workers: list[str], **settings: Any) -> None:
        self.store, self.roles, self.settings = store, workers, settings
        self.procs: list[subprocess.Popen[bytes]] = []

    async def __aenter__(self) -> Deployment:
        self.store.mkdir(parents=True, exist_ok=True)
        self.nats = EmbeddedNats(self.store / "js", log_file=self.store / "nats.log")
        url = self.nats.start()
        model = resolve_model(None)
        self.cfg = Config(nats_url=url, model=str(model.path), **self.settings)
        self._spawn(url, str(model.path))
        self.bus = await open_bus(self.cfg, url, name="bench")
        self.registry = Registry(self.bus, ttl=self.cfg.worker_ttl)
        await self.registry.start()
        deadline = time.monotonic() + 180
        while len(self.registry.workers(MODEL)) < len(self.roles):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"workers did not come up; see {self.store}")
            await asyncio.sleep(0.2)
        self.router = Router(self.bus, self.cfg, registry=self.registry)
        await self.router.start()
        self.requester = Requester(self.bus, self.registry, timeout=600.0)
        await self.requester.start()
        return self

    def _spawn(self, url: str, model: str) -> None:
        env = {**os.environ, "UCX_TLS": "self,sm", "UCX_NET_DEVICES": "lo",
               "PYTHONUNBUFFERED": "1"}
        flags = [f"--{k.replace('_', '-')}={str(v).lower() if isinstance(v, bool) else v}"
                 for k, v in self.settings.items()]
        for i, role in enumerate(self.roles):
            with open(self.store / f"{role}-{i}.log", "wb") as log:  # the child keeps its own
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "dynamo_bus.cli", "worker", "--role", role,
                     "--worker-id", f"{role}-{i}", "--nats-url", url, "--model", model,
                     *flags], stdout=log, stderr=subprocess.STDOUT, env=env))

    async def __aexit__(self, *exc: object) -> None:
        await self.requester.stop()
        await self.router.stop()
        await self.registry.stop()
        await self.bus.close()
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.nats.stop()

    async def run(self, prompt: list[int], max_tokens: int) -> dict[str, Any]:
        start = time.perf_counter()
        stream = await self.requester.submit(Request(
            request_id=new_request_id(), model=MODEL, token_ids=prompt, reply_to="",
            sampling=SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)))
        tokens: list[int] = []
        first = last = 0.0
        async for chunk in stream:
            if chunk.token_ids:
                last = time.perf_counter()
                first = first or last
                tokens += chunk.token_ids
        n = len(tokens)
        return {"tokens": tokens, "ttft_ms": (first - start) * 1000,
                "itl_ms": (last - first) * 1000 / (n - 1) if n > 1 else None,
                "e2e_ms": (last - start) * 1000}

    async def moves(self) -> dict[str, dict[str, float]]:
        """Each worker's NIXL and disaggregation counters, from the load bucket."""
        await asyncio.sleep(1.5)  # the last load reports
        out = {}
        for reg in self.registry.workers(MODEL):
            entry = await self.bus.load_kv.get(reg.worker_id)
            load = LOAD.decode(entry.value)
            out[reg.worker_id] = {**load.tier_moves.get("nixl", {}), **load.disagg}
        return out


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(200, 40000) for _ in range(n)]


COMMON = dict(threads=1, max_concurrency=16, heartbeat_interval=0.5, worker_ttl=5.0,
              kvbm_host_gib=0.5)


async def affinity(a: argparse.Namespace, store: Path) -> dict[str, Any]:
    rows = {}
    for name, steer in (("affinity (router names the decode worker)", True),
                        ("competing consumers (shared subject)", False)):
        async with Deployment(store / f"aff-{steer}", ["prefill", "decode", "decode"],
                              disagg_min_prefill_tokens=0, disagg_affinity=steer,
                              **COMMON) as d:
            async def session(i: int, d: Deployment = d) -> list[Any]:
                rng = random.Random(f"{a.seed}-{i}")  # the same turns in every deployment
                prompt, out = _tokens(rng, a.first_turn), []
                for _ in range(a.turns):
                    r = await d.run(prompt, a.answer)
                    out.append(r)
                    prompt = prompt + r["tokens"] + _tokens(rng, a.new_tokens)
                return out

            sessions = await asyncio.gather(*(session(i) for i in range(a.sessions)))
            moves = await d.moves()
        later = [r["ttft_ms"] for turns in sessions for r in turns[1:]]
        read = sum(m.get("read_bytes", 0) for m in moves.values())
        rows[name] = {"read_bytes": read, "ttft_p50": percentile(later, 50),
                      "ttft_p99": percentile(later, 99), "turns": len(later),
                      "answers": [[r["tokens"] for r in t] for t in sessions],
                      "workers": moves}
        print(f"  {name}: read {read / 2**20:.1f} MiB, later-turn TTFT p50 "
              f"{percentile(later, 50):.0f} p99 {percentile(later, 99):.0f} ms", flush=True)
    same = len({json.dumps(r.pop("answers")) for r in rows.values()}) == 1
    return {"rows": rows, "same_answers": same}


async def mixed(a: argparse.Namespace, store: Path) -> dict[str, Any]:
    rows = {}
    for name, roles in (("aggregated (2 workers)", ["aggregated", "aggregated"]),
                        ("disaggregated (1 prefill + 1 decode)", ["prefill", "decode"])):
        rng = random.Random(a.seed)
        load = [(_tokens(rng, a.long_prompt), a.short_answer) if i % 2 == 0
                else (_tokens(rng, a.short_prompt), a.long_answer) for i in range(a.requests)]
        async with Deployment(store / f"mixed-{roles[0]}", roles, **COMMON) as d:
            sem = asyncio.Semaphore(a.concurrency)

            async def one(prompt: list[int], n: int, d: Deployment = d,
                          sem: asyncio.Semaphore = sem) -> dict[str, Any]:
                async with sem:
                    return await d.run(prompt, n)

            started = time.perf_counter()
            results = await asyncio.gather(*(one(p, n) for p, n in load))
            wall = time.perf_counter() - started
            moves = await d.moves()
        ttft = [r["ttft_ms"] for r in results]
        itl = [r["itl_ms"] for r, (_, n) in zip(results, load, strict=True)
               if n == a.long_answer and r["itl_ms"] is not None]
        out_tokens = sum(len(r["tokens"]) for r in results)
        rows[name] = {"ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
                      "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99),
                      "req_s": len(results) / wall, "out_tok_s": out_tokens / wall,
                      "wall_s": wall, "workers": moves,
                      "answers": [r["tokens"] for r in results]}
        print(f"  {name}: TTFT p50 {rows[name]['ttft_p50']:.0f} p99 {rows[name]['ttft_p99']:.0f}"
              f" ms, ITL p50 {rows[name]['itl_p50']:.1f} p99 {rows[name]['itl_p99']:.1f} ms, "
              f"{rows[name]['req_s']:.2f} req/s", flush=True)
    same = len({json.dumps(r.pop("answers")) for r in rows.values()}) == 1
    return {"rows": rows, "same_answers": same}


def report(a: argparse.Namespace, results: dict[str, Any], argv: list[str]) -> str:
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    lines = ["# Disaggregated serving on the reference engine", "",
             f"- **command**: `python bench/disagg_reference.py {' '.join(argv)}`",
             f"- **date**: {datetime.now(UTC).isoformat(timespec='seconds')}",
             f"- **commit**: {commit}",
             f"- **machine**: {platform.node()}, {os.cpu_count()} CPUs, Python "
             f"{platform.python_version()}; every worker a process with 1 torch thread",
             ""]
    if "affinity" in results:
        r = results["affinity"]
        rows = list(r["rows"].items())
        base = rows[1][1]
        lines += ["## Multi-turn sessions: affinity against competing consumers", "",
                  f"{a.sessions} sessions x {a.turns} turns (first prompt {a.first_turn} "
                  f"tokens, each turn adds its {a.answer}-token answer and {a.new_tokens} "
                  "new tokens), 1 prefill + 2 decode workers, every turn prefilled remotely. "
                  f"Same greedy answers in both: {r['same_answers']}.", "",
                  "| claiming | MiB READ over NIXL | ratio | TTFT p50 (turns 2+) | p99 |",
                  "|---|---:|---:|---:|---:|"]
        for name, row in rows:
            lines.append(f"| {name} | {row['read_bytes'] / 2**20:.1f} | "
                         f"{row['read_bytes'] / max(base['read_bytes'], 1):.2f} | "
                         f"{row['ttft_p50']:.0f} ms | {row['ttft_p99']:.0f} ms |")
        lines.append("")
    if "mixed" in results:
        r = results["mixed"]
        rows = list(r["rows"].items())
        base = rows[0][1]
        lines += ["## Aggregated against disaggregated, mixed load", "",
                  f"{a.requests} requests at concurrency {a.concurrency}: half "
                  f"{a.long_prompt}-token prompts with {a.short_answer}-token answers, half "
                  f"{a.short_prompt}-token prompts with {a.long_answer}-token answers (ITL "
                  "over the long answers). Same greedy answers in both: "
                  f"{r['same_answers']}.", "",
                  "| deployment | TTFT p50 | p99 | ITL p50 | p99 | ITL p99 ratio | req/s | "
                  "output tok/s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, row in rows:
            lines.append(f"| {name} | {row['ttft_p50']:.0f} ms | {row['ttft_p99']:.0f} ms | "
                         f"{row['itl_p50']:.1f} ms | {row['itl_p99']:.1f} ms | "
                         f"{row['itl_p99'] / base['itl_p99']:.2f} | {row['req_s']:.2f} | "
                         f"{row['out_tok_s']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="affinity,mixed")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sessions", type=int, default=6)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--first-turn", type=int, default=400)
    ap.add_argument("--new-tokens", type=int, default=120)
    ap.add_argument("--answer", type=int, default=24)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--long-prompt", type=int, default=1500)
    ap.add_argument("--short-prompt", type=int, default=100)
    ap.add_argument("--short-answer", type=int, default=16)
    ap.add_argument("--long-answer", type=int, default=128)
    ap.add_argument("--out", type=Path, default=OUT / "disagg_reference")
    ap.add_argument("--keep", type=Path, default=None,
                    help="keep the servers' stores and the workers' logs here")
    argv = sys.argv[1:]
    a = ap.parse_args(argv)
    parts = a.parts.split(",")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = a.keep or Path(tmp)
        if "affinity" in parts:
            print("affinity", flush=True)
            results["affinity"] = asyncio.run(affinity(a, store))
        if "mixed" in parts:
            print("mixed load", flush=True)
            results["mixed"] = asyncio.run(mixed(a, store))
    text = report(a, results, argv)
    a.out.with_suffix(".md").write_text(text + "\n")
    a.out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(text)


if __name__ == "__main__":
    main()
