"""A bounded JetStream pull consumer: it asks the server only for as many messages as
it has room to work on, and keeps one pull open so a new message arrives at once.

nats-py's ``fetch()`` is request/response (a batch, then another round trip); this
keeps a standing pull with "credits" the way nats.go's ``Consume`` does:

* ``capacity`` bounds messages being handled plus messages asked for;
* a pull asks for the free room when it reaches half of capacity (or when nothing is
  outstanding), so under load one pull request covers many messages;
* a pull that ends (expiry, 408/409) gives back the credits it did not use, read from
  the server's ``Nats-Pending-Messages`` header; one that ends without saying (404,
  503 "no responders" for a consumer that is gone) gives back all of them;
* a watchdog forgets credits when nothing at all has come back for longer than a
  pull can live (the server lost our pulls), so a consumer never stops pulling;
* after 409/503 the next pull waits a moment (back-off), and ``on_missing`` may
  re-create a consumer that was deleted;
* a message that arrives with every slot busy (credits can be wrong after a
  reconnect) is handed back with a short delay instead of over-filling capacity.

Each delivered message is handled in its own task, owned here. After
``stop_fetching()`` no pull is issued; messages that still arrive go to ``on_drain``
(a worker hands them back, a router handles them normally).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

Handler = Callable[[Msg], Awaitable[None]]
Recreate = Callable[[], Awaitable[None]]

_RETRY_DELAY = 0.5   # seconds before pulling again after a 409/503
_GRACE = 2.0         # beyond a pull's expiry before the watchdog forgets its credits


class PullConsumer:
    def __init__(self, nc: NATS, stream: str, durable: str, *, capacity: int,
                 handler: Handler, on_drain: Handler | None = None,
                 on_missing: Recreate | None = None, expires: float = 30.0) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._nc = nc
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.capacity = capacity
        self._handler = handler
        self._on_drain = on_drain or handler
        self._on_missing = on_missing
        self._expires = expires
        self._expires_ns = int(expires * 1e9)
        self._last_heard = 0.0     # loop time of the last message or status
        self._watchdog: asyncio.TimerHandle | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._credits = 0          # messages asked for, not yet delivered
        self._tasks: set[asyncio.Task[None]] = set()   # handlers
        self._pulls: set[asyncio.Future[None]] = set()  # pull requests being sent
        self._delivered = 0
        self._fetching = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._empty = asyncio.Event()  # a no_wait pull found nothing
        self._pull_ended = asyncio.Event()

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)
        self._fetching = True
        await self._pull()

    async def _pull(self) -> None:
        if not self._fetching or self._nc.is_closed:
            return
        free = self.capacity - len(self._tasks) - self._credits
        if free <= 0 or (self._credits > 0 and free < max(1, self.capacity // 2)):
            return
        self._credits += free
        body = json.dumps({"batch": free, "expires": self._expires_ns}).encode()
        await self._nc.publish(self._next_subject, body, reply=self._inbox)
        self._arm_watchdog()

    def _arm_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        loop = asyncio.get_running_loop()
        issued = loop.time()
        self._watchdog = loop.call_later(self._expires + _GRACE, self._check_lost, issued)

    def _check_lost(self, issued: float) -> None:
        """Every pull ends with a message or a status within its expiry. Silence past
        that means the server no longer has our pulls: their credits are void."""
        self._watchdog = None
        if self._fetching and self._credits > 0 and self._last_heard < issued:
            log.warning("pulls on %s went unanswered; pulling again", self._next_subject)
            self._credits = 0
            self._spawn_pull()

    def _retry_later(self) -> None:
        if self._retry is None and self._fetching:
            def _fire() -> None:
                self._retry = None
                self._spawn_pull()
            self._retry = asyncio.get_running_loop().call_later(_RETRY_DELAY, _fire)

    async def _on_msg(self, msg: Msg) -> None:
        self._last_heard = asyncio.get_running_loop().time()
        status = msg.headers.get("Status") if msg.headers else None
        if status is not None and not msg.data:
            await self._on_status(msg, status)
            return
        self._credits = max(0, self._credits - 1)
        self._delivered += 1
        if self._fetching and len(self._tasks) >= self.capacity:
            await msg.nak(delay=_RETRY_DELAY)  # more than we asked for: not now
            return
        handler = self._handler if self._fetching else self._on_drain
        task = asyncio.create_task(self._run(handler, msg))
        self._tasks.add(task)
        self._idle.clear()
        task.add_done_callback(self._done)

    async def _on_status(self, msg: Msg, status: str) -> None:
        assert msg.headers is not None
        if status == "100":  # idle heartbeat
            return
        self._pull_ended.set()
        if status == "404":
            self._empty.set()
        pending = msg.headers.get("Nats-Pending-Messages")
        if pending is not None:
            self._credits = max(0, self._credits - int(pending))
        else:
            # A pull ended without saying how much it left unused: it was the whole
            # request (no_wait with nothing there, the server dropped it, or 503: no
            # consumer to answer it).
            self._credits = 0
        if status in ("409", "503"):
            why = msg.headers.get("Description", "no such consumer")
            log.warning("pull on %s ended: %s %s", self._next_subject, status, why)
            if self._on_missing is not None and (status == "503" or "Deleted" in why):
                try:
                    await self._on_missing()
                except Exception as exc:
                    log.warning("could not re-create the consumer: %r", exc)
            self._retry_later()
            return
        await self._pull()

    async def _run(self, handler: Handler, msg: Msg) -> None:
        try:
            await handler(msg)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A handler must answer its own errors; reaching here is a bug. Leave the
            # message un-acked so JetStream redelivers it after ack_wait.
            log.exception("unhandled error in consumer handler")

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not self._tasks:
            self._idle.set()
        if self._fetching and not self._nc.is_closed:
            self._spawn_pull()

    def _spawn_pull(self) -> None:
        pull = asyncio.ensure_future(self._pull())
        self._pulls.add(pull)
        pull.add_done_callback(self._pulls.discard)

    def on_reconnect(self) -> None:
        """Pulls do not survive a reconnect: forget their credits and pull again."""
        self._credits = 0
        if self._fetching:
            self._spawn_pull()

    def stop_fetching(self) -> None:
        self._fetching = False
        for timer in (self._watchdog, self._retry):
            if timer is not None:
                timer.cancel()
        self._watchdog = self._retry = None

    async def drain_remaining(self, *, batch: int = 256, timeout: float = 5.0) -> None:
        """After ``stop_fetching``: let open pulls run out, then empty the consumer with
        no-wait pulls; every message goes to ``on_drain``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._expires_ns / 1e9 + timeout
        while self._credits > 0 and loop.time() < deadline:
            self._pull_ended.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self._pull_ended.wait()
        self._credits = 0
        while loop.time() < deadline and not self._nc.is_closed:
            self._empty.clear()
            before = self._delivered
            body = json.dumps({"batch": batch, "no_wait": True}).encode()
            await self._nc.publish(self._next_subject, body, reply=self._inbox)
            with contextlib.suppress(TimeoutError):
                # 404 "no messages" ends a no-wait pull that found less than batch.
                async with asyncio.timeout(timeout):
                    await self._empty.wait()
            await self.wait_idle(timeout)
            if self._empty.is_set() and self._delivered == before:
                return

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no handler runs. Returns False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False

    async def close(self, timeout: float = 5.0) -> None:
        """Stop fetching, cancel handlers still running after ``timeout``, unsubscribe."""
        self.stop_fetching()
        await self.wait_idle(timeout)
        pending = self._tasks | self._pulls
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if self._sub is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        self._sub = None
