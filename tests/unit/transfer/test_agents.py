"""The NIXL agents' directory on a real nats-server: metadata published by one worker
is what another worker's agent connects with; a gone agent is a clear LookupError."""

from __future__ import annotations

from typing import Any

import pytest

from dynamo_bus.bus.connection import connect, ensure_agents_bucket
from dynamo_bus.bus.subjects import Names
from dynamo_bus.transfer import AgentDirectory, agent_name


async def test_a_published_agent_is_found_and_a_withdrawn_one_is_not(
        nats_server: Any, ucx_loopback: None) -> None:
    from dynamo_bus.kvbm.nixl import ucx_agent

    nc = await connect(nats_server.url, name="agents-test")
    try:
        js = nc.jetstream()
        names = Names("dynamo")
        lender = AgentDirectory(await ensure_agents_bucket(js, names))
        reader = AgentDirectory(await ensure_agents_bucket(js, names))
        name = agent_name("w1", "5f0c")
        owner = ucx_agent(name)
        await lender.publish(name, bytes(owner.get_agent_metadata()))
        other = ucx_agent(agent_name("w2", "77aa"))
        assert other.add_remote_agent(await reader.lookup(name)).decode() == name
        assert await reader.lookup(name) == await lender.lookup(name)
        await lender.withdraw(name)
        with pytest.raises(LookupError, match=r"no NIXL agent w1\.5f0c"):
            await AgentDirectory(await ensure_agents_bucket(js, names)).lookup(name)
        await lender.withdraw(name)  # twice: nothing left to take out, no error
    finally:
        await nc.close()


def test_an_agent_name_is_a_bucket_key() -> None:
    assert agent_name("prefill-0", "a1b2") == "prefill-0.a1b2"
    with pytest.raises(ValueError, match="cannot name"):
        agent_name("w 1", "a1b2")
