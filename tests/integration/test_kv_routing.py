"""KV-aware routing through the real stack: residency published by workers, an index
rebuilt by routers from the bucket, refusals and the router queue as a user sees them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from dynamo_bus.bus.connection import Bus, ensure_residency_bucket, open_bus
from dynamo_bus.config import Config
from dynamo_bus.routing.residency import ResidencyPublisher, ResidencyWatcher

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
# ~600 tokens of shared context, then a short question that differs per request
CONTEXT = " ".join(f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}."
                   for i in range(60))


async def _complete(url: str, prompt: str, **extra: Any) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.post(
            url + "/completions",
            json={"model": MODEL, "prompt": prompt, "max_tokens": 4, **extra}) as resp:
        return resp.status, await resp.json()


async def _served_by(s: Any, prompt: str, **extra: Any) -> tuple[str, dict[str, Any]]:
    """Send one request; the worker that ran it and the response body. Returns once the
    router has heard that worker report itself idle again, so what the router counted
    for this request in flight does not weigh on the next decision."""
    registry = s.roles.routers[-1].registry
    before = {w.worker_id: len(w._done) for w in s.roles.workers}
    status, body = await _complete(s.base_url, prompt, **extra)
    answered = time.time()  # a load report stamped later was made after the request
    assert status == 200, body
    await _until(lambda: sum(len(w._done) for w in s.roles.workers) > sum(before.values()))
    after = {w.worker_id: len(w._done) for w in s.roles.workers}
    (wid,) = [w for w in after if after[w] != before[w]]

    def idle() -> bool:
        load = registry.load(wid)
        return load is not None and load.at > answered and load.active_requests == 0

    await _until(idle)
    return wid, body


async def _until(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_requests_sharing_a_prefix_go_where_it_is_cached(stack) -> None:
    s = await stack(workers=3)  # kv_aware is the default
    first, _ = await _served_by(s, CONTEXT + " Question 0?")
    index = s.roles.routers[0].residency.index
    await _until(lambda: index.blocks_of(first) >= 30)  # the worker published its blocks
    for i in range(1, 6):
        wid, body = await _served_by(s, CONTEXT + f" Question {i}?")
        assert wid == first
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] >= 30 * 16
    # unrelated prompts go to the others: equal cost, and they hold fewer cached blocks
    spread = {(await _served_by(s, f"Unrelated prompt number {i}"))[0] for i in range(9)}
    assert first not in spread

    # A router that restarts rebuilds the same index from the bucket, and decides alike.
    old = s.roles.routers.pop()
    await old.stop()
    fresh = await s.roles.add_router()
    assert fresh.residency.index.blocks_of(first) == index.blocks_of(first)
    wid, _ = await _served_by(s, CONTEXT + " Question 99?")
    assert wid == first


async def test_a_worker_with_another_block_size_is_refused_with_a_clear_error(stack) -> None:
    s = await stack(workers=0)
    await stack(workers=1, router=False, frontend=False, block_size=32)
    status, body = await _complete(s.base_url, "hello")
    assert status == 503
    assert "blocks of 32 tokens" in body["error"]["message"]
    assert "--block-size" in body["error"]["message"]


async def test_all_busy_answers_503_without_a_queue(stack) -> None:
    s = await stack(workers=1, mock_speedup=0.02, router_busy_prefill_tokens=1)
    hog = asyncio.create_task(_complete(s.base_url, CONTEXT, max_tokens=2))
    await _until(lambda: s.roles.routers[0].routed == 1)
    status, body = await _complete(s.base_url, "hi")
    assert status == 503 and "busy" in body["error"]["message"]
    assert (await hog)[0] == 200


async def test_the_router_queue_serves_higher_priority_first(stack) -> None:
    s = await stack(workers=1, mock_speedup=0.02, router_busy_prefill_tokens=1,
                    router_queue_size=8)
    router = s.roles.routers[0]
    finished: list[str] = []

    async def send(name: str, priority: int) -> None:
        status, _ = await _complete(s.base_url, CONTEXT + name, max_tokens=1, priority=priority)
        assert status == 200
        finished.append(name)

    first = asyncio.create_task(send("first", 0))
    await _until(lambda: router.routed == 1)
    low = asyncio.create_task(send("low", 0))
    await _until(lambda: len(router._queue) == 1)
    high = asyncio.create_task(send("high", 5))
    await _until(lambda: len(router._queue) == 2)
    await asyncio.gather(first, low, high)
    assert finished == ["first", "high", "low"]


class FakeResidencySource:
    """A fake of ``ResidencySource`` (the engine side of a publisher): hands out the
    changes a test sets in ``pending``."""

    def __init__(self) -> None:
        self.pending: dict[int, str | None] = {}

    def residency_changes(self) -> dict[int, str | None]:
        out, self.pending = self.pending, {}
        return out

    def residency_snapshot(self) -> dict[int, str]:
        return {}


@pytest.fixture
async def residency(nats_server) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """``bus, source, pub = await residency(**publisher_settings)``: a bus with the
    residency bucket and a started publisher for worker ``w0``, stopped afterwards."""
    bus = await open_bus(Config(nats_url=nats_server.url), nats_server.url, name="t")
    pubs: list[ResidencyPublisher] = []

    async def make(**settings: Any) -> tuple[Bus, FakeResidencySource, ResidencyPublisher]:
        source = FakeResidencySource()
        pub = ResidencyPublisher(bus, source, "w0", instance=1, **settings)
        await pub.start()
        pubs.append(pub)
        return bus, source, pub

    yield make
    for pub in pubs:
        await pub.stop()
    await bus.close()


async def _index_of(bus: Bus) -> ResidencyWatcher:
    watcher = ResidencyWatcher(bus)
    await watcher.start()
    return watcher


async def test_residency_puts_the_server_did_not_store_are_sent_again(residency) -> None:
    bus, source, pub = await residency(window=64, ack_timeout=0.3)
    stream = f"KV_{bus.names.residency_bucket}"
    await bus.js.delete_stream(stream)  # the bucket is gone: nothing is stored
    source.pending = dict.fromkeys(range(1, 201), "device")
    sender = asyncio.create_task(pub.publish_changes())  # stalls at the window
    await asyncio.sleep(1.0)
    assert not sender.done() and len(pub._unacked) == 64
    await ensure_residency_bucket(bus.js, bus.names)  # back: overdue puts go again
    await sender
    assert await pub.flush(timeout=20) and pub.resent > 0
    assert (await bus.js.stream_info(stream)).state.messages == 200
    watcher = await _index_of(bus)
    assert watcher.index.blocks_of("w0") == 200
    await watcher.stop()


async def test_a_put_whose_ack_was_lost_never_comes_back_after_the_purge(residency) -> None:
    bus, source, pub = await residency(ack_timeout=0.2)
    on_ack = pub._on_ack
    dropped: list[object] = []

    async def lose_first(msg: Any) -> None:
        if not dropped:
            dropped.append(msg)
            return
        await on_ack(msg)

    await pub._sub.unsubscribe()
    pub._sub = await bus.nc.subscribe(pub._inbox + ".*", cb=lose_first)
    source.pending = {7: "device"}
    await pub.publish_changes()
    await bus.nc.flush()
    source.pending = {7: None}  # evicted before the put's ack came
    await pub.publish_changes()
    assert await pub.flush(timeout=5)
    await asyncio.sleep(0.5)
    await pub.resend_overdue()
    await bus.nc.flush()
    watcher = await _index_of(bus)
    assert dropped and watcher.index.blocks_of("w0") == 0
    await watcher.stop()


async def test_a_watch_restarted_after_a_reconnect_forgets_what_was_purged(residency) -> None:
    bus, source, pub = await residency()
    watcher = await _index_of(bus)
    source.pending = dict.fromkeys(range(1, 11), "device")
    await pub.publish_changes()
    assert await pub.flush(timeout=5)
    await _until(lambda: watcher.index.blocks_of("w0") == 10)
    await pub.purge()  # a stream purge leaves no marker for a watch to see
    watcher._rewatch()  # what a reconnect does
    await _until(lambda: watcher.index.blocks_of("w0") == 0)
    await watcher.stop()
