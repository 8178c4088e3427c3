"""KV blocks between workers over NIXL (UCX): the host tier registered with an agent,
blocks lent out of it under pins for another worker's READ, and blocks read in from a
lender into this engine's own host tier, from which a request's prefix is onboarded as
any other. The mixin half of :class:`~dynamo_bus.engines.paged_kv.PagedKVEngine`;
leases over the pins live in :mod:`dynamo_bus.transfer`.

An agent's metadata (``get_agent_metadata()``) grants access to the memory registered
with it: it is never logged.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from dynamo_bus.bus.messages import KV_READ_DONE, KVDescriptor, KVReadDone, unpack_hashes
from dynamo_bus.kvbm.nixl import NixlError, run_transfer, ucx_agent

T = TypeVar("T")

if TYPE_CHECKING:
    from dynamo_bus.engines.block_pool import BlockPool
    from dynamo_bus.kvbm.disk import DiskTier
    from dynamo_bus.kvbm.host import HostTier


class KVPeers:
    """See the module docstring."""

    name: str
    host: HostTier | None
    disk: DiskTier | None
    _transfers: Any
    _nixl_thread: ThreadPoolExecutor | None = None
    _peers: set[str]
    _kv_digest: bytes
    _step_lock: asyncio.Lock
    _nixl_moves: dict[str, float]

    if TYPE_CHECKING:  # PagedKVEngine's
        @property
        def pool(self) -> BlockPool: ...

        async def _copy_out(self, blocks: list[tuple[int, int]]) -> None: ...

    @property
    def kv_digest(self) -> str:
        """What a block's bytes mean (model, block shape, dtype), in hex: blocks from an
        engine whose digest differs are not read ("" with no host tier)."""
        return self._kv_digest.hex()

    async def open_transfers(self, name: str) -> Any:
        """The NIXL agent (UCX) through which other workers read this engine's host
        tier; made, and the tier registered with it, on the first call. Its metadata
        (``get_agent_metadata()``) grants access to that memory: never log it. Every
        call on the agent runs in one thread of its own, one at a time (lending and
        reading at once would otherwise use it from two threads)."""
        if self._transfers is None:
            host = self.host
            if host is None or host.data is None:
                raise RuntimeError(f"the {self.name} engine has no host tier to read from")
            self._nixl_thread = ThreadPoolExecutor(1, thread_name_prefix="kv-nixl")

            def make() -> Any:
                agent = ucx_agent(name)
                assert host is not None
                host.register(agent)
                return agent

            self._transfers = await self._on_agent(make)
        return self._transfers

    async def _on_agent(self, call: Callable[[], T]) -> T:
        """Run ``call`` in the agent's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._nixl_thread, call)

    def _close_transfers(self) -> None:
        """Let go of the agent's thread (the engine is stopping; the host tier
        deregisters itself)."""
        if self._nixl_thread is not None:
            self._nixl_thread.shutdown(wait=True)
            self._nixl_thread = None

    @property
    def transfer_block_bytes(self) -> int:
        """The bytes of one block as lent and read (0 with no host tier)."""
        return self.host.block_bytes if self.host is not None else 0

    async def park_host_blocks(self, hashes: list[int]) -> int:
        """Put the leading ``hashes`` this engine holds into its host tier, copying the
        ones only its pool holds (what a prefill hands on), once the step under way and
        its copies are done. Returns how many leading ``hashes`` the host tier holds."""
        host = self.host
        if host is None:
            return 0
        async with self._step_lock:
            ids = self.pool.lookup(hashes)
            only_pool = [(h, b) for h, b in zip(hashes, ids, strict=False) if h not in host]
            if only_pool:
                await self._copy_out(only_pool)
        return host.prefix(hashes)

    def lend_host_blocks(self, hashes: list[int]) -> tuple[list[int], list[int]]:
        """Pin the leading ``hashes`` the host tier holds and give each one's address in
        the registered buffer (``host.block_bytes`` long), for another worker's NIXL
        READ; ``return_host_blocks`` unpins them once read. Needs ``open_transfers``."""
        host = self.host
        if host is None or self._transfers is None:
            raise RuntimeError("open_transfers first")
        held = list(hashes[:host.prefix(hashes)])
        self._nixl_moves["lent_blocks"] += len(held)
        return held, [addr for addr, _, _ in host.descriptors(host.pin(held))]

    def return_host_blocks(self, hashes: list[int]) -> None:
        if self.host is not None:
            self.host.unpin(hashes)

    def transfer_metadata(self) -> bytes:
        """This engine's agent metadata, for a reader's ``pull_host_blocks``: it grants
        access to the host tier, so it goes to a bucket, never to a log."""
        if self._transfers is None:
            raise RuntimeError("open_transfers first")
        return bytes(self._transfers.get_agent_metadata())

    async def transfer_notices(self) -> list[bytes]:
        """The notifications other workers' reads sent on completion since the last
        call (a lease's "read done")."""
        agent = self._transfers
        if agent is None:
            return []
        notifs = await self._on_agent(agent.get_new_notifs)
        return [m for msgs in notifs.values() for m in msgs]

    async def pull_host_blocks(self, descriptor: KVDescriptor, metadata: bytes) -> int:
        """Read the blocks a peer lent (``descriptor``; ``metadata``: its agent's) that
        this engine holds in none of its tiers into its own host tier, in one NIXL READ
        that notifies the peer (:class:`KVReadDone`, ending its lease); a request whose
        prefix they are is then onboarded from there as any other. Returns how many of
        the leading blocks this engine now holds. Raises ``ValueError`` for a
        descriptor it must not read (another model or layout, a lapsed lease, a block
        list that does not add up) and :class:`NixlError` when the READ fails."""
        host, disk, agent = self.host, self.disk, self._transfers
        if host is None or host.data is None or agent is None:
            raise RuntimeError("open_transfers first")
        hashes, addrs, peer = self._readable(descriptor), descriptor.addrs, descriptor.agent
        notify = KV_READ_DONE.encode(KVReadDone(lease=descriptor.lease))
        missing = [i for i, h in enumerate(hashes) if not self.holds(h)]
        src, slots, evicted = host.reserve([hashes[i] for i in missing])
        new = [hashes[missing[i]] for i in src]
        plan = disk.demote(evicted) if disk is not None else []
        size = host.block_bytes

        def read() -> None:
            if disk is not None and plan:
                disk.stage(plan, host.data)  # before the READ overwrites their slots
            try:  # the bindings raise their own types: callers get NixlError
                if peer not in self._peers:
                    agent.add_remote_agent(metadata)
                    self._peers.add(peer)
                if not new:  # all held here already: only the lease to end
                    agent.send_notif(peer, notify)
                    return
                local = agent.get_xfer_descs(host.descriptors(slots), "DRAM")
                remote = agent.get_xfer_descs(
                    [(addrs[missing[i]], size, 0) for i in src], "DRAM")
            except Exception as exc:
                raise NixlError(f"NIXL cannot reach {peer}: {exc!r}") from exc
            run_transfer(agent, "READ", local, remote, peer, notify)

        ok, started = False, time.perf_counter()
        try:
            await self._on_agent(read)
            ok = True
            moves = self._nixl_moves
            moves["read_blocks"] += len(new)
            moves["read_bytes"] += len(new) * size
            moves["read_seconds"] += time.perf_counter() - started
        finally:
            host.written(new, ok=ok)
            if disk is not None:
                disk.write_later(plan, staged=ok)
        return self.held_prefix(hashes)

    def _readable(self, descriptor: KVDescriptor) -> array[int]:
        """The block hashes of a descriptor this engine may read; ``ValueError`` for one
        it must not (another model or layout, a block list that does not add up, a
        lapsed lease)."""
        hashes, peer = unpack_hashes(descriptor.hashes), descriptor.agent
        if (descriptor.kv != self.kv_digest
                or descriptor.block_bytes != self.transfer_block_bytes):
            raise ValueError(f"KV from {peer} is of another model or layout than this "
                             "engine's")
        if len(descriptor.addrs) != len(hashes):
            raise ValueError(f"KV descriptor from {peer} names {len(hashes)} blocks and "
                             f"{len(descriptor.addrs)} addresses")
        if descriptor.lease_expires <= time.time():
            raise ValueError(f"the lease on KV from {peer} ran out")
        return hashes

    def held_prefix(self, hashes: Sequence[int]) -> int:
        """How many of the leading ``hashes`` some tier of this engine holds."""
        n = 0
        while n < len(hashes) and self.holds(hashes[n]):
            n += 1
        return n

    def holds(self, block_hash: int) -> bool:
        """Whether any tier of this engine holds the block."""
        host, disk = self.host, self.disk
        return (self.pool.holds(block_hash) or (host is not None and block_hash in host)
                or (disk is not None and block_hash in disk))
