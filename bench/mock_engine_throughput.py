"""Throughput of the mock engine alone (no bus): is the simulator ever the bottleneck?

Runs N concurrent requests of 1,000 prompt tokens and 64 output tokens against
``MockEngine`` at ``speedup=1000`` on the real clock, for N in 8 and 32, and prints
output tokens per second of wall time. It also runs the same rounds on a virtual clock
to print the ceiling the simulated compute alone would allow: when the measured rate
is far below that ceiling, the engine's own Python overhead (scheduling, hashing, pool
bookkeeping, token delivery to readers) is what limits it.

    python bench/mock_engine_throughput.py [--speedup 1000] [--rounds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from dynamo_bus.bus.messages import SamplingOptions
from dynamo_bus.engines.base import EngineRequest
from dynamo_bus.engines.mock import MockEngine

PROMPT_TOKENS = 1000
OUTPUT_TOKENS = 64


class VirtualClock:
    """Sleeping advances virtual time at once: measures simulated time, not wall time."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(0)
        self.t += seconds


async def one_round(engine: MockEngine, concurrency: int, round_no: int) -> tuple[int, float]:
    # Distinct prompts, so every request pays a full prefill (no prefix-cache hits);
    # built before the clock starts, as they are the client's cost, not the engine's.
    requests = []
    for i in range(concurrency):
        base = (round_no * 1000 + i) * PROMPT_TOKENS
        prompt = [(base + j) % 31_000 + 3 for j in range(PROMPT_TOKENS)]
        requests.append(
            EngineRequest(
                request_id=f"r{round_no}-{i}",
                token_ids=prompt,
                sampling=SamplingOptions(max_tokens=OUTPUT_TOKENS),
            )
        )

    async def one(request: EngineRequest) -> int:
        n = 0
        async for out in engine.generate(request):
            n += len(out.token_ids)
        return n

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(r) for r in requests))
    return sum(counts), time.perf_counter() - start


async def measure(speedup: float, concurrency: int, rounds: int, virtual: bool) -> float:
    clock = VirtualClock() if virtual else None
    engine = MockEngine("bench", vocab_size=32_000, speedup=speedup, clock=clock)
    await engine.start()
    best = 0.0
    for r in range(rounds):
        t0 = clock.now() if clock else 0.0
        tokens, seconds = await one_round(engine, concurrency, r)
        if clock:
            seconds = clock.now() - t0
        assert tokens == concurrency * OUTPUT_TOKENS
        best = max(best, tokens / seconds)
    await engine.stop()
    return best


async def main(speedup: float, rounds: int) -> None:
    print(f"mock engine, speedup {speedup:g}, {PROMPT_TOKENS}-token prompts, "
          f"{OUTPUT_TOKENS} output tokens, best of {rounds} rounds")
    for concurrency in (8, 32):
        wall = await measure(speedup, concurrency, rounds, virtual=False)
        ceiling = await measure(speedup, concurrency, rounds, virtual=True)
        print(f"  {concurrency:3d} concurrent: {wall:10,.0f} output tokens/s "
              f"({wall * PROMPT_TOKENS / OUTPUT_TOKENS:12,.0f} prompt tokens/s); "
              f"simulated compute alone: {ceiling:12,.0f} output tokens/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speedup", type=float, default=1000.0)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(main(args.speedup, args.rounds))
