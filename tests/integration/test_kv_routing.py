"""KV-aware routing through the real stack: residency published by workers, an index
rebuilt by routers from snapshots and event batches, refusals and the router queue as a
user sees them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from nats.errors import NoRespondersError
from nats.js.errors import NoStreamResponseError

from dynamo_bus.bus.connection import Bus, ensure_residency, open_bus
from dynamo_bus.bus.messages import RESIDENCY_BATCH
from dynamo_bus.config import Config
from dynamo_bus.routing.residency import ResidencyPublisher
from dynamo_bus.routing.residency_watch import ResidencyWatcher

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
    router = s.roles.routers[0]
    (wid,) = [w.worker_id for w in s.roles.workers]

    def hogged() -> bool:  # the worker says so (not only the router's own count)
        load = router.registry.load(wid)
        return load is not None and load.active_prefill_tokens > 0

    await _until(hogged)
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


@pytest.fixture
async def residency(nats_server) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """``bus, source, pub = await residency(**publisher_settings)``: a bus with the
    residency stream and store and a started publisher for worker ``w0`` (the fixture's
    ``watch(bus)`` starts a router's watcher); all stopped afterwards."""
    bus = await open_bus(Config(nats_url=nats_server.url), nats_server.url, name="t")
    started: list[Any] = []

    async def make(instance: int = 1, **settings: Any) -> tuple[
            Bus, FakeResidencySource, ResidencyPublisher]:
        source = FakeResidencySource()
        pub = ResidencyPublisher(bus, source, "w0", instance=instance, **settings)
        await pub.start()
        started.append(pub)
        return bus, source, pub

    async def watch() -> ResidencyWatcher:
        watcher = ResidencyWatcher(bus)
        await watcher.start()
        started.append(watcher)
        return watcher

    make.watch = watch  # type: ignore[attr-defined]
    yield make
    for item in reversed(started):
        await item.stop()
    await bus.close()


def _held(watcher: ResidencyWatcher, hashes: list[int]) -> int:
    return sum(watcher.index.overlaps([h], ["w0"])["w0"] != (0, 0, 0) for h in hashes)


async def test_residency_travels_as_one_stored_message_per_interval(residency) -> None:
    bus, source, pub = await residency(interval=0.05)
    watcher = await residency.watch()
    source.pending = dict.fromkeys(range(1, 2001), "device")
    await _until(lambda: watcher.index.blocks_of("w0") == 2000)
    source.pending = {**dict.fromkeys(range(1, 11), "host"), **dict.fromkeys(range(11, 21))}
    await _until(lambda: watcher.index.blocks_of("w0") == 1990)
    assert watcher.index.overlaps(list(range(1, 12)), ["w0"])["w0"] == (0, 10, 0)
    stream = await bus.js.stream_info(bus.names.residency_stream)
    assert pub.batches == 2 and stream.state.messages == 2  # 2,020 changes, 2 messages


async def test_a_batch_the_server_did_not_store_goes_again_and_is_stored_once(residency) -> None:
    bus, source, pub = await residency()
    await pub.stop()  # driven by hand below
    await bus.js.delete_stream(bus.names.residency_stream)  # nothing can be stored
    source.pending = dict.fromkeys(range(1, 201), "device")
    with pytest.raises((NoRespondersError, NoStreamResponseError)):
        await pub.publish_changes()
    assert pub.seq == 0 and len(pub._outbox) == 1
    batch = pub._outbox[0]
    await ensure_residency(bus.js, bus.names)
    # Say the first try reached the server after all and only its ack was lost:
    await bus.js.publish(bus.names.residency_subject("w0"), RESIDENCY_BATCH.encode(batch),
                         headers={"Nats-Msg-Id": "w0:1:1"})
    source.pending = {5: None}  # evicted meanwhile: goes in the next batch
    assert await pub.publish_changes() == 1  # the same batch again, stored once
    assert await pub.publish_changes() == 1  # then the eviction
    assert pub.seq == 2
    assert (await bus.js.stream_info(bus.names.residency_stream)).state.messages == 2
    await pub.write_snapshot()
    watcher = await residency.watch()
    assert watcher.index.blocks_of("w0") == 199 and _held(watcher, [5]) == 0


async def test_a_router_that_missed_batches_heals_from_a_fresh_snapshot(residency) -> None:
    _, source, pub = await residency()
    watcher = await residency.watch()
    source.pending = dict.fromkeys(range(1, 101), "device")
    await _until(lambda: watcher.index.blocks_of("w0") == 100)
    watcher.forget("w0")  # as a router that dropped the worker, or fell behind the purges
    source.pending = {101: "device", 1: None}
    await _until(lambda: watcher.heals == 1)
    assert watcher.gaps == 1 and pub.snapshots == 2  # the start's and the one asked for
    await _until(lambda: watcher.index.blocks_of("w0") == 100)
    assert _held(watcher, [1, 2, 101]) == 2


async def test_a_new_router_reads_snapshots_then_the_batches_after_them(residency) -> None:
    bus, source, pub = await residency()
    source.pending = dict.fromkeys(range(1, 501), "device")
    await pub.flush()
    await pub.write_snapshot()
    source.pending = {**dict.fromkeys(range(1, 51)), 1000: "disk"}
    await pub.flush()
    watcher = await residency.watch()
    assert watcher.snapshots_loaded == 1 and watcher.batches == 1  # only the one after it
    assert watcher.index.blocks_of("w0") == 451
    assert watcher.index.overlaps([1000], ["w0"])["w0"] == (0, 0, 1)
    # A snapshot purges what the one before it holds (a router that loaded that one a
    # moment ago still finds every batch after it): here the first batch.
    info = await bus.js.stream_info(bus.names.residency_stream)
    await pub.write_snapshot()
    assert (await bus.js.stream_info(bus.names.residency_stream)).state.messages == (
        info.state.messages - 1)


async def test_a_restarted_worker_replaces_what_its_earlier_run_held(residency) -> None:
    _, source, pub = await residency(instance=1)
    watcher = await residency.watch()
    source.pending = dict.fromkeys(range(1, 101), "device")
    await _until(lambda: watcher.index.blocks_of("w0") == 100)
    await pub.stop()
    _, source2, _ = await residency(instance=2)
    source2.pending = {7: "device"}
    await _until(lambda: watcher.index.blocks_of("w0") == 1)
    fresh = await residency.watch()
    assert fresh.index.blocks_of("w0") == 1


async def test_a_watch_restarted_after_a_reconnect_forgets_what_was_dropped(residency) -> None:
    _, source, pub = await residency()
    watcher = await residency.watch()
    source.pending = dict.fromkeys(range(1, 11), "device")
    await _until(lambda: watcher.index.blocks_of("w0") == 10)
    await pub.stop()  # removes its snapshot and batches: nothing for a watch to see
    watcher._rewatch()  # what a reconnect does
    await _until(lambda: watcher.index.blocks_of("w0") == 0)
