"""The NIXL agents' directory: where each worker publishes its agent's metadata (the
agents bucket, see subjects.md) and where a worker about to READ another's KV looks it
up by the agent name a :class:`~dynamo_bus.bus.messages.KVDescriptor` carries.

An agent's name is ``<worker_id>.<incarnation>``: a restarted worker has a new agent
and so a new name, and a reader never pairs a new process's memory with an old one's
metadata. The metadata grants access to the memory registered with the agent: it goes
to the bucket and to the reader's NIXL agent, never to a log.
"""

from __future__ import annotations

import re

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

_KEY = re.compile(r"[-/_=.a-zA-Z0-9]+")


def agent_name(worker_id: str, incarnation: str) -> str:
    """The NIXL agent name of one worker process."""
    name = f"{worker_id}.{incarnation}"
    if not _KEY.fullmatch(name):
        raise ValueError(f"{name!r} cannot name a NIXL agent")
    return name


class AgentDirectory:
    """See the module docstring. ``kv``: the agents bucket
    (:func:`dynamo_bus.bus.connection.ensure_agents_bucket`)."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._known: dict[str, bytes] = {}  # agent -> metadata, read once per agent

    async def publish(self, agent: str, metadata: bytes) -> None:
        await self._kv.put(agent, metadata)

    async def withdraw(self, agent: str) -> None:
        """Take the agent's entry out (its worker is stopping)."""
        self._known.pop(agent, None)
        try:
            await self._kv.delete(agent)
        except KeyNotFoundError:
            pass

    async def lookup(self, agent: str) -> bytes:
        """The agent's metadata; ``LookupError`` when no such agent is published (its
        worker stopped, or never opened one)."""
        if (metadata := self._known.get(agent)) is not None:
            return metadata
        try:
            entry = await self._kv.get(agent)
        except KeyNotFoundError:
            entry = None
        if entry is None or not entry.value:
            raise LookupError(f"no NIXL agent {agent} is published (its worker is gone?)")
        self._known[agent] = entry.value
        return entry.value
