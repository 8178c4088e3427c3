"""The first routing strategies, as a user sees them: where requests end up."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import pytest

from dynamo_bus.errors import ConfigError

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"


async def _send(url: str, n: int, **extra: object) -> list[str]:
    """Send ``n`` unary requests at once; returns the worker each ran on (from the
    frontend's token stream)."""
    async with aiohttp.ClientSession() as http:
        async def one(i: int) -> int:
            body = {"model": MODEL, "prompt": f"q{i}", "max_tokens": 4, **extra}
            async with http.post(url + "/completions", json=body) as resp:
                await resp.read()
                return resp.status

        return [str(s) for s in await asyncio.gather(*(one(i) for i in range(n)))]


def _served(stack_) -> Counter[str]:
    return Counter({w.worker_id: len(w._done) for w in stack_.roles.workers})


async def test_round_robin_spreads_evenly(stack) -> None:
    s = await stack(workers=3, router_mode="round_robin")
    assert set(await _send(s.base_url, 30)) == {"200"}
    assert sorted(_served(s).values()) == [10, 10, 10]


async def test_random_reaches_every_worker(stack) -> None:
    s = await stack(workers=3)
    assert set(await _send(s.base_url, 60, routing_strategy="random")) == {"200"}
    served = _served(s)
    assert sum(served.values()) == 60 and min(served.values()) > 0


async def test_least_loaded_avoids_the_busy_worker(stack) -> None:
    s = await stack(workers=2, mock_speedup=0.2)  # slow enough that load is visible
    busy, idle = s.roles.workers
    async with aiohttp.ClientSession() as http:
        body = {"model": MODEL, "prompt": "long", "max_tokens": 200, "worker_id": busy.worker_id}
        hogs = [asyncio.create_task(http.post(s.base_url + "/completions", json=body))
                for _ in range(8)]
        registry = s.roles.routers[0].registry

        def hogged() -> bool:
            load = registry.load(busy.worker_id)
            return load is not None and load.active_requests == 8

        assert await registry.wait_until(hogged, timeout=10)
        before = _served(s)
        assert set(await _send(s.base_url, 6, routing_strategy="least_loaded",
                               max_tokens=2)) == {"200"}
        after = _served(s)
        for t in hogs:
            t.cancel()
        await asyncio.gather(*hogs, return_exceptions=True)
    assert after[idle.worker_id] - before[idle.worker_id] == 6


async def test_direct_to_an_unknown_worker_is_a_400(stack) -> None:
    s = await stack(workers=1)
    async with aiohttp.ClientSession() as http, http.post(
            s.base_url + "/completions",
            json={"model": MODEL, "prompt": "x", "worker_id": "nobody"}) as resp:
        err = (await resp.json())["error"]
    assert resp.status == 400 and err["param"] == "worker_id"
    assert "nobody" in err["message"]


async def test_an_unknown_default_strategy_is_refused_at_start(stack) -> None:
    with pytest.raises(ConfigError, match="--router-mode"):
        await stack(workers=0, frontend=False, router_mode="psychic")
