"""The simulated engine, driven on a virtual clock so timings are exact and instant."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from dynamo_bus.bus.messages import SamplingOptions
from dynamo_bus.engines.base import EngineOutput, EngineRequest
from dynamo_bus.engines.mock import MockEngine, decode_ms, prefill_ms
from dynamo_bus.errors import InvalidRequest, Overloaded, PromptTooLong
from dynamo_bus.hashing import HASH_SCHEME


class FakeClock:
    """A fake of the engine's Clock seam: sleeping advances virtual time instantly.

    A sleeper first lets every ready task run, so a reader woken by the step that just
    finished sees the time that step ended, not the end of the next one.
    """

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        for _ in range(5):
            await asyncio.sleep(0)
        self.t += max(seconds, 0.0)


async def after_the_step(engine: MockEngine) -> None:
    """Until the step under way has ended (bounded)."""
    for _ in range(100):
        if not engine._planned:
            return
        await asyncio.sleep(0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def engine(clock: FakeClock) -> AsyncIterator[MockEngine]:
    eng = MockEngine("mock-model", vocab_size=32_000, eos_token_ids=(2,), clock=clock)
    await eng.start()
    yield eng
    await eng.stop()


def req(rid: str, prompt: list[int], **sampling: object) -> EngineRequest:
    return EngineRequest(request_id=rid, token_ids=prompt,
                         sampling=SamplingOptions(**sampling))  # type: ignore[arg-type]


def prompt(n: int, start: int = 1) -> list[int]:
    return [(start + i) % 30_000 + 3 for i in range(n)]


async def run(engine: MockEngine, request: EngineRequest) -> list[EngineOutput]:
    return [out async for out in engine.generate(request)]


def tokens(outs: list[EngineOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


async def test_same_prompt_and_seed_give_the_same_tokens(engine: MockEngine) -> None:
    p = prompt(50)
    a = tokens(await run(engine, req("a", p, max_tokens=20, seed=7)))
    b = tokens(await run(engine, req("b", p, max_tokens=20, seed=7)))
    c = tokens(await run(engine, req("c", p, max_tokens=20, seed=8)))
    assert a == b and len(a) == 20
    assert a != c


async def test_unseeded_requests_differ_but_greedy_depends_on_the_prompt_only(
        engine: MockEngine) -> None:
    p = prompt(50)
    a = tokens(await run(engine, req("a", p, max_tokens=20)))
    b = tokens(await run(engine, req("b", p, max_tokens=20)))
    assert a != b
    g1 = tokens(await run(engine, req("g1", p, max_tokens=20, temperature=0.0, seed=1)))
    g2 = tokens(await run(engine, req("g2", p, max_tokens=20, temperature=0.0, seed=2)))
    assert g1 == g2


async def test_output_stays_in_vocab_and_never_emits_eos(clock: FakeClock) -> None:
    eng = MockEngine("m", vocab_size=4, eos_token_ids=(0, 2), clock=clock)
    await eng.start()
    out = tokens(await run(eng, req("a", [1, 3, 1], max_tokens=200)))
    await eng.stop()
    assert set(out) == {1, 3}


async def test_length_and_stop_finish_reasons(engine: MockEngine) -> None:
    p = prompt(30)
    outs = await run(engine, req("a", p, max_tokens=12, seed=3))
    assert outs[-1].finish_reason == "length" and len(tokens(outs)) == 12
    assert all(o.finish_reason is None for o in outs[:-1])
    stream = tokens(outs)
    stop = stream[5]
    stopped = await run(engine, req("b", p, max_tokens=12, seed=3, stop_token_ids=[stop]))
    assert stopped[-1].finish_reason == "stop"
    assert tokens(stopped) == stream[: stream.index(stop) + 1]  # the stop token included


async def test_logprobs_only_when_asked(engine: MockEngine) -> None:
    with_lp = await run(engine, req("a", prompt(20), max_tokens=5, logprobs=1))
    assert sum(len(o.logprobs or []) for o in with_lp) == 5
    assert all(lp <= 0 for o in with_lp for lp in o.logprobs or [])
    assert all(o.logprobs is None for o in await run(engine, req("b", prompt(20), max_tokens=5)))


async def test_prefill_time_follows_the_dynamo_formula(engine: MockEngine,
                                                       clock: FakeClock) -> None:
    expected = prefill_ms(1000) / 1000  # ~32 ms
    clock.t = 5.0  # the engine idled since start: that time is not credited to anyone
    gen = engine.generate(req("a", prompt(1000), max_tokens=11))
    first = await anext(gen)
    ttft = clock.now() - 5.0
    assert first.token_ids and ttft == pytest.approx(expected, rel=0.02)
    rest = [o async for o in gen]
    assert len(tokens([first, *rest])) == 11
    itl = (clock.now() - 5.0 - ttft) / 10
    u = 1011 / (16384 * 16)  # KV tokens over capacity
    assert itl == pytest.approx(decode_ms(u) / 1000, rel=0.02)


async def test_speedup_divides_simulated_time(clock: FakeClock) -> None:
    eng = MockEngine("m", vocab_size=32_000, speedup=10.0, clock=clock)
    await eng.start()
    await run(eng, req("a", prompt(1000), max_tokens=1))
    await eng.stop()
    assert clock.now() == pytest.approx(prefill_ms(1000) / 1000 / 10, rel=0.1)


async def test_prefix_cache_hit_is_reported_and_faster(engine: MockEngine,
                                                       clock: FakeClock) -> None:
    p = prompt(1000)
    cold = await run(engine, req("cold", p, max_tokens=1))
    cold_ttft = clock.now()
    assert cold[0].cached_tokens == 0
    start = clock.now()
    warm = await run(engine, req("warm", p[:990] + prompt(10, 20_000), max_tokens=1))
    warm_ttft = clock.now() - start
    assert warm[0].cached_tokens == 976  # 61 full blocks of 16 shared
    assert warm_ttft == pytest.approx(prefill_ms(24) / 1000, rel=0.1)
    assert warm_ttft < cold_ttft / 1.5


async def test_chunked_prefill_splits_long_prompts(clock: FakeClock) -> None:
    eng = MockEngine("m", vocab_size=32_000, max_num_batched_tokens=1024, clock=clock)
    await eng.start()
    await run(eng, req("a", prompt(3000), max_tokens=1))
    await eng.stop()
    chunks = 2 * prefill_ms(1024) + prefill_ms(3000 - 2048)
    assert clock.now() == pytest.approx(chunks / 1000, rel=0.05)


async def test_fifty_concurrent_requests_are_batched(engine: MockEngine,
                                                     clock: FakeClock) -> None:
    wants = [5 + (i * 7) % 40 for i in range(50)]
    results = await asyncio.gather(*(
        run(engine, req(f"r{i}", prompt(100 + i * 13, i * 101), max_tokens=n))
        for i, n in enumerate(wants)))
    assert [len(tokens(outs)) for outs in results] == wants
    assert all(outs[-1].finish_reason == "length" for outs in results)
    sequential = sum(prefill_ms(100 + i * 13) + (n - 1) * decode_ms(0.0)
                     for i, n in enumerate(wants)) / 1000
    assert clock.now() < sequential / 5  # one batch, not fifty turns
    load = engine.load()
    assert (load.active_requests, load.waiting_requests, load.active_blocks) == (0, 0, 0)


async def test_a_small_pool_preempts_and_still_finishes_everything(clock: FakeClock) -> None:
    eng = MockEngine("m", vocab_size=32_000, block_size=4, num_blocks=24, clock=clock)
    await eng.start()
    results = await asyncio.gather(*(
        run(eng, req(f"r{i}", prompt(10, i * 50), max_tokens=30, seed=i)) for i in range(6)))
    assert [len(tokens(outs)) for outs in results] == [30] * 6
    assert eng.num_preemptions > 0
    assert eng.load().active_blocks == 0
    # Being preempted and recomputed does not change what a request says.
    alone = await run(eng, req("solo", prompt(10, 5 * 50), max_tokens=30, seed=5))
    assert tokens(alone) == tokens(results[5])
    await eng.stop()


async def test_max_num_seqs_limits_the_running_batch(clock: FakeClock) -> None:
    eng = MockEngine("m", vocab_size=32_000, max_num_seqs=2, clock=clock)
    await eng.start()
    gens = [eng.generate(req(f"r{i}", prompt(20, i), max_tokens=50)) for i in range(4)]
    firsts = await asyncio.gather(*(anext(g) for g in gens[:2]))
    assert all(f.token_ids for f in firsts)
    reader = [asyncio.ensure_future(anext(g)) for g in gens[2:]]
    await asyncio.sleep(0)
    load = eng.load()
    assert (load.active_requests, load.waiting_requests) == (2, 2)
    assert load.active_prefill_tokens == 40
    await eng.abort("r0")
    await eng.abort("r1")
    outs = await asyncio.gather(*reader)
    assert all(o.token_ids for o in outs)
    for g in gens:
        await g.aclose()
    await eng.stop()


async def test_abort_ends_the_stream_and_frees_every_block(engine: MockEngine) -> None:
    gen = engine.generate(req("a", prompt(500), max_tokens=1000))
    first = await anext(gen)
    assert first.token_ids and engine.load().active_blocks > 0
    await engine.abort("a")
    rest = [o async for o in gen]
    assert rest[-1].finish_reason == "cancelled"
    assert engine.load().active_requests == 0
    await after_the_step(engine)  # the step under way may still write its blocks
    assert engine.load().active_blocks == 0
    await engine.abort("a")  # a finished request: no-op
    await engine.abort("unknown")


async def test_abort_while_waiting(clock: FakeClock) -> None:
    eng = MockEngine("m", vocab_size=32_000, max_num_seqs=1, clock=clock)
    await eng.start()
    g1 = eng.generate(req("a", prompt(20), max_tokens=100))
    g2 = eng.generate(req("b", prompt(20, 9), max_tokens=100))
    await anext(g1)
    t2 = asyncio.ensure_future(anext(g2))
    await asyncio.sleep(0)
    assert eng.load().waiting_requests == 1
    await eng.abort("b")
    assert (await t2).finish_reason == "cancelled"
    assert eng.load().waiting_requests == 0
    await g1.aclose()
    await g2.aclose()
    await eng.stop()


async def test_closing_or_cancelling_the_reader_aborts(engine: MockEngine) -> None:
    gen = engine.generate(req("a", prompt(100), max_tokens=1000))
    await anext(gen)
    await gen.aclose()
    await after_the_step(engine)
    assert engine.load().active_blocks == 0

    async def read_all() -> None:
        async for _ in engine.generate(req("b", prompt(100), max_tokens=5000)):
            pass

    task = asyncio.ensure_future(read_all())
    for _ in range(20):
        await asyncio.sleep(0)
    assert engine.load().active_requests == 1
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert engine.load().active_requests == 0
    await after_the_step(engine)
    assert engine.load().active_blocks == 0


async def test_a_slow_reader_gets_coalesced_outputs(engine: MockEngine) -> None:
    gen = engine.generate(req("a", prompt(100), max_tokens=50))
    first = await anext(gen)
    # Stop reading while a longer request in the same batch runs to its end.
    await run(engine, req("b", prompt(100, 7), max_tokens=60))
    rest = [o async for o in gen]
    assert len(first.token_ids) == 1
    assert len(rest) == 1 and len(rest[0].token_ids) == 49
    assert rest[0].finish_reason == "length"


async def test_stop_cancels_everything_and_is_idempotent(clock: FakeClock) -> None:
    eng = MockEngine("m", vocab_size=32_000, clock=clock)
    await eng.start()
    gens = [eng.generate(req(f"r{i}", prompt(50, i), max_tokens=1000)) for i in range(3)]
    for g in gens:
        await anext(g)
    await eng.stop()
    for g in gens:
        assert [o async for o in g][-1].finish_reason == "cancelled"
    assert eng.load().active_blocks == 0
    await eng.stop()
    with pytest.raises(Overloaded):
        await anext(eng.generate(req("late", prompt(5))))
    with pytest.raises(RuntimeError):
        await eng.start()


async def test_requests_that_cannot_fit_are_refused(clock: FakeClock) -> None:
    eng = MockEngine("m", vocab_size=100, context_length=64, block_size=4, num_blocks=8,
                     clock=clock)
    with pytest.raises(Overloaded):  # not started
        await anext(eng.generate(req("a", [1, 2])))
    await eng.start()
    with pytest.raises(PromptTooLong) as too_long:
        await anext(eng.generate(req("a", [1] * 60, max_tokens=10)))
    assert too_long.value.param == "max_tokens" and too_long.value.status == 413
    with pytest.raises(PromptTooLong):
        await anext(eng.generate(req("a", [1] * 64)))
    with pytest.raises(InvalidRequest, match="KV blocks"):  # 40 tokens > 8 blocks of 4
        await anext(eng.generate(req("a", [1] * 30, max_tokens=10)))
    with pytest.raises(InvalidRequest):
        await anext(eng.generate(req("a", [1, 100])))  # outside the vocabulary
    with pytest.raises(InvalidRequest):
        await anext(eng.generate(req("a", [])))
    with pytest.raises(InvalidRequest):
        await anext(eng.generate(req("a", [1, 2], max_tokens=0)))
    assert eng.load().active_requests == 0
    await eng.stop()


async def test_a_running_request_id_cannot_be_reused(engine: MockEngine) -> None:
    gen = engine.generate(req("a", prompt(10), max_tokens=100))
    await anext(gen)
    with pytest.raises(InvalidRequest, match="already running"):
        await anext(engine.generate(req("a", prompt(10))))
    await gen.aclose()


async def test_fingerprint_and_limits(engine: MockEngine) -> None:
    fp = engine.fingerprint
    assert (fp.model, fp.block_size, fp.hash_scheme) == ("mock-model", 16, HASH_SCHEME)
    assert engine.context_length == 8192 and engine.name == "mock"
    assert engine.load().total_blocks == 16384


async def test_real_clock_at_high_speedup() -> None:
    eng = MockEngine("m", vocab_size=32_000, speedup=1000.0)
    await eng.start()
    results = await asyncio.gather(*(run(eng, req(f"r{i}", prompt(200, i), max_tokens=16))
                                     for i in range(8)))
    await eng.stop()
    assert [len(tokens(r)) for r in results] == [16] * 8


async def test_a_request_read_only_at_the_end_gets_one_output_with_every_token() -> None:
    eng = MockEngine("mock-model", vocab_size=32_000, speedup=1e6)
    await eng.start()
    try:
        sampling = SamplingOptions(max_tokens=12, temperature=0.0)
        streamed = [out async for out in eng.generate(
            EngineRequest(request_id="s", token_ids=list(range(40)), sampling=sampling))]
        whole = [out async for out in eng.generate(
            EngineRequest(request_id="w", token_ids=list(range(40)), sampling=sampling,
                          stream=False))]
    finally:
        await eng.stop()
    assert len(streamed) > 1 and len(whole) == 1
    assert whole[0].token_ids == [t for out in streamed for t in out.token_ids]
    assert whole[0].finish_reason == "length"
