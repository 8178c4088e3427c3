"""What residency costs per request: messages and bytes a worker stores in JetStream.

The same stream of cache changes goes through two builds' ``ResidencyPublisher``, each
against its own fresh nats-server on 127.0.0.1, side by side in one run:

* the changes: a mock engine (real scheduler, block pool and hashes; 4,096 blocks of 16
  tokens, so it evicts once full) serves ``--requests`` distinct 1,000-token prompts with
  64 output tokens, one at a time; what ``residency_changes()`` reports after each
  request is one tick of the publisher (the worst case for batching: in ``serve`` under
  load a 20 ms tick usually holds several requests' changes);
* "before": the build at ``--before`` (default dfd89f6, one JetStream KV message per
  block stored or evicted); "after": this tree (one batch message per tick, plus
  snapshots).

Counted on the publisher's connection: every message it publishes into a stream or
store (subject + headers + payload bytes), JetStream API calls apart; and what the
server holds at the end.

    python bench/residency_cost.py            # writes bench/results/residency_cost.md/.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from checkout import checkout, head

ROOT = Path(__file__).resolve().parent.parent
PROMPT, OUTPUT, BLOCKS = 1000, 64, 4096


async def make_changes(requests: int) -> list[list[tuple[int, str | None]]]:
    """Per request, the residency changes a mock engine reports after serving it."""
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from dynamo_bus.bus.messages import SamplingOptions
    from dynamo_bus.engines.base import EngineRequest
    from dynamo_bus.engines.mock import MockEngine

    engine = MockEngine("m", vocab_size=49152, num_blocks=BLOCKS, speedup=1e6)
    await engine.start()
    rng = np.random.default_rng(0)
    ticks = []
    engine.residency_changes()
    for i in range(requests):
        req = EngineRequest(request_id=f"r{i}", token_ids=rng.integers(0, 49152, PROMPT).tolist(),
                            sampling=SamplingOptions(max_tokens=OUTPUT, ignore_eos=True))
        async for _ in engine.generate(req):
            pass
        ticks.append(list(engine.residency_changes().items()))
    await engine.stop()
    return ticks


async def publish(tree: str, changes_file: str) -> dict[str, Any]:
    """Run in a child whose ``dynamo_bus`` is the build under test."""
    from dynamo_bus.bus.connection import open_bus
    from dynamo_bus.bus.natsserver import EmbeddedNats
    from dynamo_bus.config import Config
    from dynamo_bus.routing.residency import ResidencyPublisher

    ticks = json.loads(Path(changes_file).read_bytes())  # noqa: ASYNC240 (before any I/O)
    counted = {"messages": 0, "bytes": 0}

    class FakeResidencySource:
        """A fake of ``ResidencySource``: hands out one prepared tick at a time."""

        def __init__(self) -> None:
            self.pending: dict[int, str | None] = {}

        def residency_changes(self) -> dict[int, str | None]:
            out, self.pending = self.pending, {}
            return out

    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedNats(Path(tmp) / "js")
        url = server.start()
        try:
            bus = await open_bus(Config(nats_url=url), url, name="w")
            raw = bus.nc.publish

            async def counting(subject: str, payload: bytes = b"", reply: str = "",
                               headers: dict[str, str] | None = None) -> None:
                if not subject.startswith("$JS.API."):
                    counted["messages"] += 1
                    counted["bytes"] += len(subject) + len(payload) + sum(
                        len(k) + len(v) + 4 for k, v in (headers or {}).items())
                await raw(subject, payload, reply=reply, headers=headers)

            bus.nc.publish = counting  # type: ignore[method-assign]
            source = FakeResidencySource()
            pub = ResidencyPublisher(bus, source, "w0", instance=1)
            pub._stopping = True  # ticks are driven below, not by its own loop
            await pub.start()
            start = dict(counted)
            t = time.perf_counter()
            for tick in ticks:
                source.pending = {int(h): tier for h, tier in tick}
                await pub.publish_changes()
                if hasattr(pub, "_snapshot_due") and pub._snapshot_due():
                    await pub.write_snapshot()  # what its own loop would do
            await pub.flush()
            elapsed = time.perf_counter() - t
            held = {}
            for info in (await bus.js.streams_info()):
                held[info.config.name] = {"messages": info.state.messages,
                                          "bytes": info.state.bytes,
                                          "last_seq": info.state.last_seq}
            await bus.close()
        finally:
            server.stop()
    n = len(ticks)
    msgs, size = counted["messages"] - start["messages"], counted["bytes"] - start["bytes"]
    import dynamo_bus

    return {"tree": tree, "code": dynamo_bus.__file__, "requests": n, "messages": msgs,
            "bytes": size,
            "messages_per_request": msgs / n, "bytes_per_request": size / n,
            "changes": sum(len(t) for t in ticks), "seconds": elapsed, "streams": held}


def run_child(tree: Path, changes: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, __file__, "--child", str(tree), str(changes)],
                         env=env, capture_output=True, text=True, timeout=900, check=False)
    if out.returncode:
        raise RuntimeError(f"{tree}: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def render(r: dict[str, Any]) -> str:
    b, a = r["before"], r["after"]
    lines = [
        "# Residency: what a worker stores in JetStream per request", "",
        f"Command: `{r['command']}` · {r['date']} · commit {r['commit']} · "
        f"{platform.machine()}, {os.cpu_count()} cores · one run.", "",
        f"A mock engine ({BLOCKS:,} blocks of 16 tokens, evicting once full) served "
        f"{a['requests']} distinct {PROMPT:,}-token prompts with {OUTPUT} output tokens; "
        f"the {a['changes']:,} residency changes it reported (stored and evicted blocks) "
        "went through each build's publisher, one publish tick per request, each against "
        "its own nats-server. Counted: messages published into streams and stores "
        "(subject + headers + payload), JetStream API calls apart.", "",
        "| build | messages / request | bytes / request | messages in all | bytes in all | "
        "publish time s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, x in (("before: one KV message per block (" + r["before_ref"] + ")", b),
                     ("after: event batches + snapshots", a)):
        lines.append(f"| {label} | {x['messages_per_request']:,.1f} | "
                     f"{x['bytes_per_request']:,.0f} | {x['messages']:,} | {x['bytes']:,} | "
                     f"{x['seconds']:.2f} |")
    lines += ["", f"Ratio after / before: messages {a['messages'] / b['messages']:.3f}, "
              f"bytes {a['bytes'] / b['bytes']:.3f}.", "",
              "What the server held at the end (streams: messages, bytes):", ""]
    for label, x in (("before", b), ("after", a)):
        held = ", ".join(f"`{k}` {v['messages']:,} / {v['bytes']:,}"
                         for k, v in sorted(x["streams"].items()) if "RESID" in k.upper())
        lines.append(f"- {label}: {held}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--before", default="dfd89f6", help="the build to compare with")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "residency_cost")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(publish(*args.child))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        changes = Path(tmp) / "changes.json"
        changes.write_text(json.dumps(asyncio.run(make_changes(args.requests))))
        with checkout(args.before) as before:
            result: dict[str, Any] = {"before": run_child(before, changes),
                                      "after": run_child(ROOT, changes)}
    result.update(before_ref=args.before, commit=head(),
                  date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                  command="python bench/residency_cost.py " + " ".join(sys.argv[1:]))
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    text = render(result)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
