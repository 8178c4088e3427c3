"""Live workers and their load, as a local cache of the workers and load KV buckets.

Nothing here is authoritative: the buckets are. A registry is rebuilt by watching
them, so a router or frontend that restarts sees the same workers as its peers.
Liveness is judged by when this process last heard a heartbeat (not by the worker's
clock), so hosts with skewed clocks still agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from nats.js.kv import KeyValue

from dynamo_bus.bus.connection import Bus
from dynamo_bus.bus.messages import LOAD, REGISTRATION, Load, Registration
from dynamo_bus.errors import ProtocolError

log = logging.getLogger(__name__)


class Registry:
    def __init__(self, bus: Bus, *, ttl: float) -> None:
        self._workers_kv = bus.workers_kv
        self._load_kv = bus.load_kv
        # A watch is an ephemeral consumer: it does not survive a server restart.
        bus.on_reconnect.append(self._rewatch)
        self.ttl = ttl
        self._workers: dict[str, tuple[Registration, float]] = {}
        self._loads: dict[str, Load] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._retired: set[asyncio.Task[None]] = set()  # cancelled, still finishing
        self._closed = False
        self._changed = asyncio.Event()
        # (worker id, incarnation): a worker left, or the process behind its id was
        # replaced by a new one (what ran on the old one is gone with it).
        self.on_removed: list[Callable[[str, str], None]] = []

    async def start(self) -> None:
        workers_seen = asyncio.Event()
        self._start_watches(workers_seen)
        try:
            async with asyncio.timeout(10):
                await workers_seen.wait()
        except BaseException:
            await self.stop()
            raise

    def _start_watches(self, workers_seen: asyncio.Event) -> None:
        self._tasks = [
            asyncio.create_task(self._watch(self._workers_kv, self._on_worker, workers_seen)),
            asyncio.create_task(self._watch(self._load_kv, self._on_load, asyncio.Event())),
        ]

    def _rewatch(self) -> None:
        if not self._tasks:
            return  # not started, or stopped
        for task in self._tasks:
            task.cancel()
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)
        self._start_watches(asyncio.Event())

    async def stop(self) -> None:
        self._closed = True
        tasks = [*self._tasks, *self._retired]
        self._tasks = []
        for task in tasks:
            task.cancel()
        if tasks:  # bounded: nats-py may turn a cancel into a TimeoutError (3.11)
            await asyncio.wait(tasks, timeout=5.0)

    async def _watch(self, kv: KeyValue, apply: Callable[[str, bytes | None], None],
                     initial_done: asyncio.Event) -> None:
        while not self._closed:
            try:
                # After a server restart JetStream takes a moment to load its streams;
                # a watch created before that never delivers. Ask until it answers.
                await kv.status()
                watcher = await kv.watchall()
                try:
                    async for entry in watcher:
                        if entry is None:  # end of the initial snapshot
                            initial_done.set()
                            continue
                        deleted = entry.operation is not None or not entry.value
                        apply(entry.key, None if deleted else entry.value)
                finally:
                    with contextlib.suppress(Exception):
                        await watcher.stop()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the watch died (server restart): start over
                log.warning("watch on %s failed (%s); re-watching", kv._name, exc)
                await asyncio.sleep(0.5)

    def _on_worker(self, key: str, value: bytes | None) -> None:
        loop = asyncio.get_running_loop()
        if value is None:
            gone = self._workers.pop(key, None)
            if gone is not None:
                self._removed(key, gone[0].incarnation)
            return
        try:
            reg = REGISTRATION.decode(value)
        except ProtocolError as exc:
            log.warning("ignoring worker %s: %s", key, exc)
            return
        old = self._workers.get(key)
        self._workers[key] = (reg, loop.time())
        if old is not None and old[0].incarnation != reg.incarnation:
            log.info("worker %s restarted (a new process under the same id)", key)
            self._removed(key, old[0].incarnation, keep_load=True)
        self._changed.set()

    def _on_load(self, key: str, value: bytes | None) -> None:
        if value is None:
            self._loads.pop(key, None)
            return
        with contextlib.suppress(ProtocolError):
            self._loads[key] = LOAD.decode(value)
            self._changed.set()

    def _removed(self, worker_id: str, incarnation: str, *, keep_load: bool = False) -> None:
        if not keep_load:
            self._loads.pop(worker_id, None)
            log.info("worker %s left", worker_id)
        for cb in self.on_removed:
            cb(worker_id, incarnation)

    def _expire(self) -> None:
        now = asyncio.get_running_loop().time()
        for wid in [w for w, (_, seen) in self._workers.items() if now - seen > self.ttl]:
            reg, _ = self._workers.pop(wid)
            self._removed(wid, reg.incarnation)

    def workers(self, model: str | None = None, *,
                include_draining: bool = False) -> list[Registration]:
        """Live workers taking new work, optionally only those serving ``model``."""
        self._expire()
        return [reg for reg, _ in self._workers.values()
                if (model is None or reg.model == model)
                and (include_draining or not reg.draining)]

    def get(self, worker_id: str) -> Registration | None:
        self._expire()
        found = self._workers.get(worker_id)
        return found[0] if found else None

    def models(self) -> set[str]:
        return {r.model for r in self.workers(include_draining=True)}

    def load(self, worker_id: str) -> Load | None:
        return self._loads.get(worker_id)

    async def wait_for_worker(self, model: str | None = None, timeout: float = 30.0) -> bool:
        """Wait until at least one live worker serves ``model``."""
        return await self.wait_until(lambda: bool(self.workers(model)), timeout)

    async def wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``condition()`` holds, re-checked on every registration or load
        change."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not condition():
            self._changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
        return True
