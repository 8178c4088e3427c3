"""A worker's side of KV moving between workers: lending prefilled blocks out of its
host tier under a lease, and pulling another worker's lent blocks in.

:class:`KVShare` opens the engine's NIXL agent under the name
``<worker_id>.<incarnation>``, publishes its metadata to the agents' directory, and
runs one small loop that ends leases: by the readers' notifications (polling the agent
also progresses it, which delivers them) or when their time runs out. ``lend`` pins a
prompt's blocks and describes them in a :class:`~dynamo_bus.bus.messages.KVDescriptor`;
``pull`` finds the lender's metadata and has the engine READ the blocks it lacks. The
prefill and decode roles stand on these two calls; an aggregated worker can lend too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from dynamo_bus.bus.messages import KVDescriptor, pack_hashes
from dynamo_bus.transfer import AgentDirectory, LeaseBook, agent_name

log = logging.getLogger(__name__)

POLL_S = 0.02  # how often the lender looks for readers' notifications


class LendingEngine(Protocol):
    """What :class:`KVShare` needs of an engine (a PagedKVEngine with a host tier)."""

    @property
    def kv_digest(self) -> str: ...
    @property
    def transfer_block_bytes(self) -> int: ...

    async def open_transfers(self, name: str) -> Any: ...
    def transfer_metadata(self) -> bytes: ...
    async def transfer_notices(self) -> list[bytes]: ...
    async def park_host_blocks(self, hashes: list[int]) -> int: ...
    def lend_host_blocks(self, hashes: list[int]) -> tuple[list[int], list[int]]: ...
    def return_host_blocks(self, hashes: list[int]) -> None: ...
    async def pull_host_blocks(self, descriptor: KVDescriptor, metadata: bytes) -> int: ...


if TYPE_CHECKING:  # mypy checks that both engines are what KVShare needs
    from dynamo_bus.engines.mock import MockEngine
    from dynamo_bus.engines.reference.engine import ReferenceEngine

    def _conforms(a: ReferenceEngine, b: MockEngine) -> tuple[LendingEngine, LendingEngine]:
        return a, b


class KVShare:
    """See the module docstring. ``lease_s``: how long lent blocks stay pinned when no
    reader says it is done."""

    def __init__(self, engine: LendingEngine, directory: AgentDirectory, *, worker_id: str,
                 incarnation: str, lease_s: float = 30.0) -> None:
        self.engine = engine
        self.directory = directory
        self.agent = agent_name(worker_id, incarnation)
        self.leases = LeaseBook(engine.return_host_blocks, ttl=lease_s)
        self._task: asyncio.Task[None] | None = None
        self._serial = 0
        self._settled = asyncio.Event()  # set by the lease loop when no lease is left

    async def start(self) -> None:
        await self.engine.open_transfers(self.agent)
        await self.directory.publish(self.agent, self.engine.transfer_metadata())
        self._task = asyncio.create_task(self._end_leases(), name=f"leases-{self.agent}")

    async def stop(self) -> None:
        """Withdraw the agent (no new reader finds it) and release every lease."""
        with contextlib.suppress(Exception):
            await self.directory.withdraw(self.agent)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.leases.close()

    async def settle(self, timeout: float) -> bool:
        """Wait, at most ``timeout`` seconds, until every lease has ended (a stopping
        worker gives its readers their time); whether they all did."""
        if self.leases:
            self._settled.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._settled.wait()
        return not self.leases

    async def lend(self, request_id: str, hashes: list[int], *,
                   first_token: int = -1) -> KVDescriptor | None:
        """Park the leading ``hashes`` the engine holds in its host tier, pin them under
        a new lease and describe them; None when it holds none of them."""
        await self.engine.park_host_blocks(hashes)
        held, addrs = self.engine.lend_host_blocks(hashes)
        if not held:
            return None
        self._serial += 1
        lease = f"{request_id}.{self._serial}"
        ttl = self.leases.grant(lease, held)
        return KVDescriptor(request_id=request_id, agent=self.agent, hashes=pack_hashes(held),
                            addrs=addrs, block_bytes=self.engine.transfer_block_bytes,
                            kv=self.engine.kv_digest, lease=lease,
                            lease_expires=time.time() + ttl, first_token=first_token)

    async def pull(self, descriptor: KVDescriptor) -> int:
        """Bring the blocks ``descriptor`` names that this engine lacks into its host
        tier; returns how many of the leading blocks it now holds. ``LookupError``: the
        lender's agent is gone; ``ValueError``: a descriptor this engine must not read;
        ``NixlError``: the READ failed. The caller then prefills the prompt itself."""
        metadata = await self.directory.lookup(descriptor.agent)
        return await self.engine.pull_host_blocks(descriptor, metadata)

    async def _end_leases(self) -> None:
        while True:
            wait = self.leases.next_expiry()
            await asyncio.sleep(POLL_S if wait is None else min(POLL_S, wait))
            if not self.leases:
                self._settled.set()
                continue
            try:
                self.leases.on_notices(await self.engine.transfer_notices())
            except Exception:  # the loop outlives one bad poll: leases still expire
                log.exception("KV share %s: reading transfer notifications failed",
                              self.agent)
            for lease in self.leases.expire():
                log.warning("KV share %s: lease %s ran out before its reader was done; "
                            "its blocks are free again", self.agent, lease)
