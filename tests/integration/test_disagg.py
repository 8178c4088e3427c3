"""Disaggregated prefill/decode on the reference engine with real NIXL (UCX over
loopback shared memory): greedy answers equal the aggregated ones (and transformers')
whichever tier or worker a prefix comes from, each descriptor is claimed once among competing decode
workers, and a decode worker killed with descriptors claimed but not acked loses none.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dynamo_bus.bus.connection import open_bus
from dynamo_bus.bus.messages import (
    KV_DESCRIPTOR,
    RESPONSE,
    Chunk,
    KVDescriptor,
    Request,
    RoutingHints,
    SamplingOptions,
    pack_hashes,
    unbatch,
)
from dynamo_bus.bus.natsserver import EmbeddedNats
from dynamo_bus.bus.registry import Registry
from dynamo_bus.bus.subjects import Names
from dynamo_bus.config import Config
from dynamo_bus.errors import DynamoBusError
from dynamo_bus.hashing import sequence_hashes
from dynamo_bus.roles import Roles
from dynamo_bus.serving.requester import Requester, new_request_id
from dynamo_bus.worker.runtime import Worker
from tests.conftest import FAST, Processes

MODEL = "SmolLM2-135M-Instruct"

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("ucx_loopback")]


def _config(url: str, model: Path, **overrides: Any) -> Config:
    settings: dict[str, Any] = dict(
        nats_url=url, model=str(model), served_model_name=MODEL, engine="reference",
        dtype="float32", threads=1, num_blocks=64, kvbm_host_gib=0.05,
        disagg_min_prefill_tokens=0, frontend_process=False, **FAST)
    settings.update(overrides)
    return Config(**settings)


class Client:
    """Submits requests over the bus and reads their token streams."""

    def __init__(self, cfg: Config, url: str) -> None:
        self.cfg, self.url = cfg, url

    async def __aenter__(self) -> Client:
        self.bus = await open_bus(self.cfg, self.url, name="test-client")
        self.registry = Registry(self.bus, ttl=self.cfg.worker_ttl)
        await self.registry.start()
        self.requester = Requester(self.bus, self.registry, timeout=120.0)
        await self.requester.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.requester.stop()
        await self.registry.stop()
        await self.bus.close()

    async def tokens(self, prompt: list[int], max_tokens: int = 12,
                     worker_id: str | None = None) -> list[int]:
        stream = await self.requester.submit(Request(
            request_id=new_request_id(), model=MODEL, token_ids=prompt, reply_to="",
            sampling=SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
            routing=RoutingHints(worker_id=worker_id)))
        out: list[int] = []
        async for chunk in stream:
            out += chunk.token_ids
        return out


async def _roles(cfg: Config, **workers: int) -> Roles:
    roles = Roles(cfg)
    for role, count in workers.items():
        if count:
            await roles.add_workers(count, role)
    await roles.add_router()
    return roles


def _prompts(seed: int = 7) -> list[list[int]]:
    """Twelve prefixes of 6 blocks, each followed by two different tails: the second
    round finds its prefix in some tier of the prefill worker that computed it, or in
    the decode worker's own cache."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(100, 40000) for _ in range(96)] for _ in range(12)]
    tails = [[[rng.randrange(100, 40000) for _ in range(37)] for _ in range(2)]
             for _ in prefixes]
    return [p + tails[i][r] for r in range(2) for i, p in enumerate(prefixes)]


def _transformers(model: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Hugging Face transformers' greedy continuations, EOS not ending them (as
    ``ignore_eos``)."""
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            gen = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n,
                              min_new_tokens=n, pad_token_id=0)
            out.append(gen[0, len(prompt):].tolist())
    return out


def _moves(worker: Worker, tier: str, key: str) -> float:
    return float(worker.engine.load().tier_moves.get(tier, {}).get(key, 0))


@pytest.fixture
async def nats(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path / "js", log_file=tmp_path / "nats.log")
    server.start()
    yield server
    server.stop()


@pytest.mark.timeout(600)
async def test_disaggregated_greedy_answers_equal_aggregated(
        nats: EmbeddedNats, fp32_dir: Path, tmp_path: Path) -> None:
    prompts = _prompts()
    tiers = dict(num_blocks=24, kvbm_host_gib=20 * 737280 / 2**30, kvbm_disk_gib=0.1,
                 kvbm_disk_admit=1)
    agg_cfg = _config(nats.url, fp32_dir, namespace="agg", kvbm_disk_dir=str(tmp_path / "a"),
                      **tiers)
    roles = await _roles(agg_cfg, aggregated=1)
    try:
        async with Client(agg_cfg, nats.url) as client:
            expected = [await client.tokens(p) for p in prompts]
    finally:
        await roles.stop()

    cfg = _config(nats.url, fp32_dir, namespace="disagg", kvbm_disk_dir=str(tmp_path / "d"),
                  **tiers)
    roles = await _roles(cfg, prefill=2, decode=1)
    try:
        async with Client(cfg, nats.url) as client:
            got = [await client.tokens(p) for p in prompts]
            # The decode worker's own cache: the same prompt again reads nothing.
            decode = next(w for w in roles.workers if w.role == "decode")
            read = _moves(decode, "nixl", "read_blocks")
            assert await client.tokens(prompts[-1]) == expected[-1]
            assert _moves(decode, "nixl", "read_blocks") == read
        prefill = [w for w in roles.workers if w.role == "prefill"]
        counts = [w.disagg_counts() for w in prefill]
        claims = decode.disagg_counts()
    finally:
        await roles.stop()
    assert got == expected
    assert _transformers(fp32_dir, prompts[:3], 12) == expected[:3]
    # Both prefill workers handed requests on; prefixes came back from their host and
    # disk tiers; the decode worker imported every claim and read only what it lacked.
    assert all(c["descriptors"] > 0 for c in counts), counts
    assert sum(_moves(w, "host", "onboarded_blocks") for w in prefill) > 0
    assert sum(_moves(w, "disk", "onboarded_blocks") for w in prefill) > 0
    assert claims["claimed"] == len(prompts) + 1 == claims["imported"], claims
    assert not [k for k in claims if k.startswith("fault.")], claims
    assert 0 < read < sum(c["lent_blocks"] for c in counts)


@pytest.mark.timeout(600)
async def test_each_descriptor_is_claimed_once_among_competing_decode_workers(
        nats: EmbeddedNats, model_dir: Any) -> None:
    """500 requests, one prefill worker, three decode workers on the shared subject
    (no affinity): every request is answered once, by one claim."""
    cfg = _config(nats.url, model_dir.path, dtype="auto", disagg_affinity=False,
                  max_concurrency=128)
    roles = await _roles(cfg, prefill=1, decode=3)
    rng = random.Random(3)
    prompts = [[rng.randrange(100, 40000) for _ in range(20)] for _ in range(500)]
    try:
        async with Client(cfg, nats.url) as client:
            outs = await asyncio.gather(*(client.tokens(p, max_tokens=2) for p in prompts))
        decoders = [w for w in roles.workers if w.role == "decode"]
        claims = [w.disagg_counts() for w in decoders]
        prefill = next(w for w in roles.workers if w.role == "prefill").disagg_counts()
        info = await roles.workers[0].bus.js.stream_info(Names(cfg.namespace).kv_stream)
    finally:
        await roles.stop()
    assert all(len(o) == 2 for o in outs)
    assert prefill["descriptors"] == 500
    assert sum(c["claimed"] for c in claims) == 500, claims
    assert all(c["claimed"] > 0 for c in claims), claims  # they did compete
    assert sum(c.get("imported", 0) for c in claims) == 500, claims
    assert info.state.messages == 0  # nothing left unclaimed


@pytest.mark.timeout(600)
async def test_a_decode_worker_killed_mid_claim_loses_no_request(
        nats: EmbeddedNats, model_dir: Any, procs: Processes, tmp_path: Path) -> None:
    """Descriptors steered to decode worker A reach it (delivered, not acked) while it
    is stopped; it is killed with -9. The router moves them to the shared subject, B
    claims them and, for those delivered before, prefills the prompt itself: every
    request completes with the answer B gives when asked directly."""
    cfg = _config(nats.url, model_dir.path, dtype="auto", worker_ttl=10.0)
    roles = await _roles(cfg, prefill=1, decode=1)
    a = procs.start("worker", "--role", "decode", "--worker-id", "dec-a", "--nats-url",
                    nats.url, "--model", str(model_dir.path), "--served-model-name", MODEL,
                    "--engine", "reference", "--threads", "1", "--num-blocks", "64",
                    "--kvbm-host-gib", "0.05", "--heartbeat-interval", "0.2",
                    "--worker-ttl", "10", log=tmp_path / "a.log")
    rng = random.Random(5)
    prompts = [[rng.randrange(100, 40000) for _ in range(40)] for _ in range(8)]
    names = Names(cfg.namespace)
    try:
        async with Client(cfg, nats.url) as client:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 120
            while client.registry.get("dec-a") is None or not await _pulling(client, names):
                assert a.poll() is None, (tmp_path / "a.log").read_text()[-3000:]
                assert loop.time() < deadline, "decode worker A never came up"
                await asyncio.sleep(0.2)
            for _ in range(10):  # until A's standing pull takes some while it is stopped
                os.kill(a.pid, signal.SIGSTOP)
                runs = [asyncio.create_task(client.tokens(p, worker_id="dec-a"))
                        for p in prompts]
                if await _claimed_by_stopped(client, names, len(prompts)):
                    break
                os.kill(a.pid, signal.SIGCONT)  # its pull had ended: let it serve these
                await asyncio.gather(*runs)
            else:
                raise AssertionError("no descriptor reached A while it was stopped")
            os.kill(a.pid, signal.SIGKILL)
            outs = await asyncio.gather(*runs)
            b = next(w for w in roles.workers if w.role == "decode")
            assert b.disagg_counts().get("fault.redelivered", 0) >= 1
            assert b.disagg_counts()["claimed"] == len(prompts)
            direct = [await client.tokens(p, worker_id=b.worker_id) for p in prompts]
    finally:
        await roles.stop()
    assert outs == direct


async def _pulling(client: Client, names: Any) -> bool:
    try:
        info = await client.bus.js.consumer_info(names.kv_stream, names.kv_consumer("dec-a"))
    except Exception:
        return False
    return info.num_waiting > 0


async def _claimed_by_stopped(client: Client, names: Any, n: int) -> bool:
    """Whether A's consumer has descriptors delivered and not acked, once all ``n``
    are published (within a few seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while loop.time() < deadline:
        info = await client.bus.js.consumer_info(names.kv_stream, names.kv_consumer("dec-a"))
        if info.num_ack_pending + info.num_pending >= n:
            return info.num_ack_pending > 0
        await asyncio.sleep(0.05)
    return False


@pytest.mark.timeout(300)
async def test_a_descriptor_it_must_not_read_is_prefilled_by_the_decode_worker(
        nats: EmbeddedNats, model_dir: Any) -> None:
    """Descriptors with a newer schema version, another model's KV, blocks that are not
    the prompt's, a lapsed lease, an agent nobody published or one NIXL cannot reach:
    each request is answered whole, by a local prefill, and the cause is counted."""
    cfg = _config(nats.url, model_dir.path, dtype="auto")
    roles = await _roles(cfg, decode=1)
    decode = roles.workers[0]
    names = Names(cfg.namespace)
    rng = random.Random(11)
    prompt = [rng.randrange(100, 40000) for _ in range(40)]
    hashes = sequence_hashes(prompt, cfg.block_size)
    assert decode.share is not None
    await decode.share.directory.publish("junk.1", b"not an agent's metadata")
    good = dict(agent="junk.1", hashes=pack_hashes(hashes), addrs=[4096, 8192],
                block_bytes=decode.share.engine.host.block_bytes,
                kv=decode.share.engine.kv_digest, lease="l", lease_expires=time.time() + 60)
    cases = {
        "bad_descriptor": dict(v=99),
        "foreign_kv": dict(kv="00" * 16),
        "block_mismatch": dict(hashes=pack_hashes([h + 1 for h in hashes])),
        "lease_expired": dict(lease_expires=time.time() - 1),
        "unknown_agent": dict(agent="nobody.1"),
        "transfer_failed": {},
    }
    try:
        async with Client(cfg, nats.url) as client:
            want = await client.tokens(prompt, worker_id=decode.worker_id)
            for cause, change in cases.items():
                inbox = client.bus.nc.new_inbox()
                req = Request(request_id=new_request_id(), model=MODEL, token_ids=prompt,
                              reply_to=inbox, sampling=SamplingOptions(
                                  max_tokens=12, temperature=0.0, ignore_eos=True))
                desc = KVDescriptor(request_id=req.request_id, request=req,
                                    **{**good, **change})  # type: ignore[arg-type]
                got = await _answer(client, inbox, names.kv_subject(
                    MODEL, f"{hashes[0]:016x}", decode.worker_id), KV_DESCRIPTOR.encode(desc))
                assert got == want, cause
                assert decode.disagg_counts().get(f"fault.{cause}") == 1, (
                    cause, decode.disagg_counts())
            # Not even a request inside: nobody to answer; dropped and counted.
            await client.bus.js.publish(names.kv_subject(MODEL, "0" * 16), b"{}")
            for _ in range(100):
                if decode.disagg_counts().get("fault.bad_descriptor") == 2:
                    break
                await asyncio.sleep(0.05)
            assert decode.disagg_counts()["fault.bad_descriptor"] == 2
    finally:
        await roles.stop()


async def _answer(client: Client, inbox: str, subject: str, data: bytes) -> list[int]:
    """Publish a descriptor and read its request's chunks off ``inbox``."""
    sub = await client.bus.nc.subscribe(inbox)
    await client.bus.js.publish(subject, data)
    tokens: list[int] = []
    try:
        while True:
            msg = await sub.next_msg(timeout=60)
            for item in unbatch(RESPONSE.decode(msg.data)):
                assert isinstance(item, Chunk), item
                tokens += item.token_ids
                if item.finish_reason is not None:
                    return tokens
    finally:
        await sub.unsubscribe()


@pytest.mark.timeout(300)
def test_serve_disagg_answers_the_openai_api(procs: Processes, tmp_path: Path) -> None:
    """`dynamo-bus serve --disagg`: one prefill and one decode worker behind the same
    OpenAI API; a long prompt is prefilled by one and decoded by the other."""
    import json
    import urllib.request

    proc = procs.start("serve", "--disagg", "--http-port", "0", "--store-dir",
                       str(tmp_path / "js"), "--disagg-min-prefill-tokens", "64",
                       "--kvbm-host-gib", "0.1", stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, start_new_session=True)
    assert proc.stdout is not None
    port, log = None, []
    for raw in proc.stdout:
        log.append(raw.decode(errors="replace"))
        if "frontend serving" in log[-1]:
            port = int(log[-1].rsplit(":", 1)[1].split("/")[0])
            break
    assert port is not None, "".join(log[-30:])
    drain = subprocess.Popen(["cat"], stdin=proc.stdout, stdout=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        body = {"model": MODEL, "max_tokens": 24, "temperature": 0, "messages": [
            {"role": "system", "content": "You are a concise assistant. " * 12},
            {"role": "user", "content": "What is the capital of France?"}]}
        post = urllib.request.Request(f"{base}/v1/chat/completions", method="POST",
                                      data=json.dumps(body).encode(),
                                      headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(post, timeout=120) as resp:
            answer = json.load(resp)
        assert "Paris" in answer["choices"][0]["message"]["content"], answer
        time.sleep(0.5)  # the load report that counts the claim
        with urllib.request.urlopen(f"{base}/health", timeout=10) as resp:
            health = json.load(resp)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        drain.wait(10)
    roles = {w["role"]: w for w in health["workers"]}
    assert set(roles) == {"prefill", "decode"}, health
    assert roles["prefill"]["kv_transfers"]["descriptors"] == 1
    assert roles["decode"]["kv_transfers"]["imported"] == 1
    assert roles["decode"]["kv_transfers"]["read_blocks"] > 0


async def test_mock_workers_disaggregate_too(stack: Any) -> None:
    """The simulated engine takes the prefill and decode roles (KV handed over in
    bookkeeping and simulated time): long prompts are prefilled on the prefill worker,
    each claimed once, and the answers are the ones an aggregated mock gives."""
    s = await stack(workers=0, frontend=False, kvbm_host_gib=0.5, disagg_min_prefill_tokens=64)
    await s.roles.add_workers(1, "prefill")
    await s.roles.add_workers(2, "decode")
    rng = random.Random(1)
    prompts = [[rng.randrange(100, 40000) for _ in range(n)] for n in (300, 40, 500, 200)]
    async with Client(s.cfg, s.nats_url) as client:
        got = [await client.tokens(p, max_tokens=8) for p in prompts]
    decoders = [w for w in s.roles.workers if w.role == "decode"]
    claims = [w.disagg_counts() for w in decoders]
    prefill = next(w for w in s.roles.workers if w.role == "prefill").disagg_counts()
    assert prefill["descriptors"] == 3  # the 40-token prompt stayed on its decode worker
    assert sum(c.get("imported", 0) for c in claims) == 3, claims
    read = sum(_moves(w, "nixl", "read_blocks") for w in decoders)
    assert read == sum(n // 16 for n in (300, 500, 200))  # every full block, once
    agg = await stack(workers=1, frontend=False, namespace="agg")
    async with Client(agg.cfg, agg.nats_url) as client:
        assert [await client.tokens(p, max_tokens=8) for p in prompts] == got


async def test_a_prefill_worker_that_cannot_hand_over_answers_with_an_error(
        stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever goes wrong after the prefill, the requester gets an OpenAI-shaped error
    naming it, never a wait for its timeout."""
    s = await stack(workers=0, frontend=False, kvbm_host_gib=0.5, disagg_min_prefill_tokens=0)
    prefill = (await s.roles.add_workers(1, "prefill"))[0]
    await s.roles.add_workers(1, "decode")
    assert prefill.share is not None

    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("host tier unavailable")

    monkeypatch.setattr(prefill.share, "lend", broken)
    async with Client(s.cfg, s.nats_url) as client:
        with pytest.raises(DynamoBusError) as failed:
            await asyncio.wait_for(client.tokens(list(range(100, 400))), 30)
    assert (failed.value.status, failed.value.code) == (500, "handoff_failed")
    assert "host tier unavailable" in failed.value.message


async def test_aggregated_and_disaggregated_workers_serve_one_model_together(
        stack: Any) -> None:
    """An aggregated worker beside a prefill and a decode worker: the router sends each
    request to whichever is cheaper, and every answer is the one a lone aggregated
    worker gives."""
    s = await stack(workers=1, frontend=False, kvbm_host_gib=0.5, disagg_min_prefill_tokens=64)
    await s.roles.add_workers(1, "prefill")
    await s.roles.add_workers(1, "decode")
    rng = random.Random(2)
    prompts = [[rng.randrange(100, 40000) for _ in range(rng.randrange(30, 600))]
               for _ in range(24)]
    async with Client(s.cfg, s.nats_url) as client:
        got = await asyncio.gather(*(client.tokens(p, max_tokens=6) for p in prompts))
    by_role = {w.role: w for w in s.roles.workers}
    assert by_role["prefill"].disagg_counts()["descriptors"] > 0
    assert by_role["decode"].disagg_counts()["claimed"] > 0
    agg = await stack(workers=1, frontend=False, namespace="agg")
    async with Client(agg.cfg, agg.nats_url) as client:
        assert [await client.tokens(p, max_tokens=6) for p in prompts] == got


async def test_a_read_that_outlasts_its_timeout_is_prefilled_by_the_decode_worker(
        stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A READ that does not finish within --kv-transfer-timeout: the decode worker stops
    waiting, prefills the prompt itself and counts the cause; the answer is whole."""
    s = await stack(workers=0, frontend=False, kvbm_host_gib=0.5, disagg_min_prefill_tokens=0,
                    kv_transfer_timeout=0.3)
    await s.roles.add_workers(1, "prefill")
    decode = (await s.roles.add_workers(1, "decode"))[0]
    assert decode.share is not None

    async def stuck(*args: Any, **kwargs: Any) -> int:
        await asyncio.sleep(30)
        return 0

    prompt = list(range(100, 400))
    async with Client(s.cfg, s.nats_url) as client:
        want = await client.tokens(prompt, max_tokens=6)
        monkeypatch.setattr(decode.share, "pull", stuck)
        assert await asyncio.wait_for(client.tokens(prompt, max_tokens=6), 20) == want
    assert decode.disagg_counts()["fault.transfer_timeout"] == 1
