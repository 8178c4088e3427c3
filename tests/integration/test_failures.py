"""Nothing lost: routers killed mid-load, workers drained by SIGTERM, clients that hang
up, and messages delivered twice."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
import urllib.request

import aiohttp
import pytest

from dynamo_bus.bus.connection import connect
from dynamo_bus.bus.messages import REQUEST, RESPONSE, Chunk, Request, SamplingOptions
from dynamo_bus.bus.subjects import Names
from tests.conftest import FAST, Processes

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"


def _flags(cfg_nats: str, model_path: str, **extra: object) -> list[str]:
    # The mock engine: these workers need the model's config and tokenizer, no weights.
    settings = {**FAST, "nats_url": cfg_nats, "model": model_path, "engine": "mock", **extra}
    out: list[str] = []
    for k, v in settings.items():
        out += ["--" + k.replace("_", "-"), str(v)]
    return out


async def _one_at_a_time_worker(s, procs: Processes, model_dir, tmp_path, worker_id: str
                                ) -> subprocess.Popen[bytes]:
    """A worker in its own process that runs one request at a time, each for seconds
    (so a test can catch it mid-request with others queued), registered and ready."""
    log = tmp_path / "w.log"
    proc = procs.start("worker", *_flags(s.nats_url, str(model_dir.path), worker_id=worker_id,
                                         max_concurrency=1, mock_speedup=0.05), log=log)
    registry = s.roles.routers[0].registry
    for _ in range(300):
        if await registry.wait_for_worker(MODEL, timeout=0.1):
            return proc
        if proc.poll() is not None:
            raise AssertionError(f"the worker exited with {proc.returncode}:\n"
                                 f"{log.read_text()[-2000:]}")
    raise AssertionError(f"the worker never registered:\n{log.read_text()[-2000:]}")


async def _direct(http: aiohttp.ClientSession, url: str, i: int, worker_id: str) -> tuple:
    """A unary completion routed to ``worker_id``: (status, body)."""
    body = {"model": MODEL, "prompt": f"p{i}", "max_tokens": 24, "seed": i,
            "worker_id": worker_id}
    async with http.post(url + "/completions", json=body) as resp:
        return resp.status, await resp.json()


async def _chat(http: aiohttp.ClientSession, url: str, i: int, max_tokens: int = 32) -> tuple:
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"req {i}"}],
            "max_tokens": max_tokens, "stream": True, "seed": i}
    async with http.post(url + "/chat/completions", json=body) as resp:
        raw = await resp.read()
    return resp.status, raw.rstrip().endswith(b"data: [DONE]"), b'"error"' in raw


async def test_killing_a_router_replica_mid_load_loses_no_request(stack, procs, model_dir,
                                                                  tmp_path):
    s = await stack(workers=2, router=False, mock_speedup=20.0)
    routers = [procs.start("router", *_flags(s.nats_url, str(model_dir.path)),
                           log=tmp_path / f"r{i}.log") for i in range(2)]
    js, names = s.roles.workers[0].bus.js, Names(s.cfg.namespace)
    # Both replicas are pulling: two standing pull requests on the shared consumer.
    for _ in range(300):
        info = await js.consumer_info(names.request_stream, names.router_consumer)
        if info.num_waiting >= 2:
            break
        await asyncio.sleep(0.1)
    assert info.num_waiting >= 2, "router replicas never started pulling"
    # Freeze one replica so the requests the server hands it stay un-acked, then
    # kill it: those requests must come back to the other replica.
    routers[0].send_signal(signal.SIGSTOP)
    async with aiohttp.ClientSession() as http:
        tasks = [asyncio.create_task(_chat(http, s.base_url, i)) for i in range(120)]
        await asyncio.sleep(0.5)
        routers[0].send_signal(signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 90)
    info = await js.consumer_info(names.request_stream, names.router_consumer)
    failed = [r for r in results if r != (200, True, False)]
    assert failed == [], f"{len(failed)} of {len(results)} requests failed"
    # Deliveries beyond one per message: the dead replica's requests, delivered again.
    assert info.delivered.consumer_seq > info.delivered.stream_seq, (
        "the killed replica held no request: nothing was tested")


async def test_sigterm_drains_a_worker_and_hands_back_queued_work(stack, procs, model_dir,
                                                                  tmp_path):
    s = await stack(workers=0)
    proc = await _one_at_a_time_worker(s, procs, model_dir, tmp_path, "slow")
    registry = s.roles.routers[0].registry
    async with aiohttp.ClientSession() as http:
        tasks = [asyncio.create_task(_direct(http, s.base_url, i, "slow")) for i in range(3)]
        await asyncio.sleep(1.0)      # the first is generating, two are queued
        await s.roles.add_workers(1)  # somewhere for handed-back work to go
        proc.send_signal(signal.SIGTERM)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    assert await asyncio.to_thread(proc.wait, 30) == 0
    assert [status for status, _ in results] == [200, 200, 200]
    assert all(body["usage"]["completion_tokens"] == 24 for _, body in results)
    log = (tmp_path / "w.log").read_text()
    assert "handed back request" in log
    assert registry.get("slow") is None


async def test_client_disconnect_stops_the_worker(stack) -> None:
    s = await stack(workers=1, mock_speedup=1.0)  # real-time mock: ~7 ms a token
    worker = s.roles.workers[0]
    body = {"model": MODEL, "prompt": "tell me everything", "max_tokens": 5000, "stream": True}
    async with aiohttp.ClientSession() as http:
        resp = await http.post(s.base_url + "/completions", json=body)
        got = 0
        async for line in resp.content:
            got += line.startswith(b"data:")
            if got >= 3:
                break
        assert worker.engine.load().active_requests == 1
        resp.close()  # the client hangs up mid-stream
    for _ in range(100):
        if worker.engine.load().active_requests == 0:
            break
        await asyncio.sleep(0.05)
    assert worker.engine.load().active_requests == 0, "worker still generating"
    assert not worker._running


async def test_plain_nats_publisher_gets_the_token_stream(stack) -> None:
    s = await stack(workers=1, frontend=False)
    names = Names(s.cfg.namespace)
    nc = await connect(s.nats_url, name="plain")
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    req = {"request_id": "plain1", "model": MODEL, "token_ids": [1, 2, 3, 4, 5],
           "reply_to": inbox, "sampling": {"max_tokens": 6}}
    await nc.jetstream().publish(names.request_subject(MODEL), json.dumps(req).encode())
    tokens: list[int] = []
    while True:
        msg = await sub.next_msg(timeout=10)
        chunk = json.loads(msg.data)
        assert chunk["type"] == "chunk"
        tokens += chunk["token_ids"]
        if chunk.get("finish_reason"):
            break
    await nc.close()
    assert len(tokens) == 6
    assert chunk["finish_reason"] == "length"
    assert chunk["usage"]["prompt_tokens"] == 5


async def test_a_redelivered_request_is_generated_once(stack) -> None:
    s = await stack(workers=1, router=False, frontend=False, mock_speedup=50.0)
    worker = s.roles.workers[0]
    nc = await connect(s.nats_url, name="dup")
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    req = Request(request_id="dup1", model=MODEL, token_ids=[5] * 40, reply_to=inbox,
                  sampling=SamplingOptions(max_tokens=8))
    js = nc.jetstream()
    for attempt in range(2):  # the same request twice, as a redelivery would bring it
        await js.publish(worker.work_subject, REQUEST.encode(req),
                         headers={"Nats-Msg-Id": f"dup1:{attempt}"})
    finishes, tokens = 0, 0
    with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
        while True:
            msg = await sub.next_msg(timeout=1.5)
            chunk = RESPONSE.decode(msg.data)
            assert isinstance(chunk, Chunk)
            tokens += len(chunk.token_ids)
            finishes += chunk.finish_reason is not None
    await nc.close()
    assert (finishes, tokens) == (1, 8)


async def test_second_start_reuses_streams_and_buckets(stack) -> None:
    first = await stack(workers=1)
    js = first.roles.workers[0].bus.js
    names = Names(first.cfg.namespace)
    before = await js.stream_info(names.request_stream)
    second = await stack(workers=1)  # a second process against the same server
    after = await js.stream_info(names.request_stream)
    assert before.created == after.created
    assert (await js.consumer_info(names.request_stream, names.router_consumer)).created
    async with aiohttp.ClientSession() as http:
        assert (await _chat(http, second.base_url, 1, 4))[:2] == (200, True)


def _start_serve(procs: Processes, model_dir, tmp_path) -> tuple[subprocess.Popen[bytes], int]:
    proc = procs.start("serve", "--http-port", "0", "--model", str(model_dir.path),
                       "--store-dir", str(tmp_path / "js"), "--engine", "mock",
                       "--mock-speedup", "1000", stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode()
        if "frontend serving" in line:
            return proc, int(line.rsplit(":", 1)[1].split("/")[0])
    raise AssertionError("serve never came up")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True, check=False).stdout
    return [int(x) for x in out.split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_serve_answers_then_stops_with_everything_it_started(procs, model_dir, tmp_path, sig):
    """`dynamo-bus serve` (own nats-server, frontend in a child process) answers; on
    SIGTERM it exits 0, and even after SIGKILL none of its children outlive it."""
    proc, port = _start_serve(procs, model_dir, tmp_path)
    children = _children(proc.pid)
    assert len(children) == 2  # nats-server and the frontend
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=10) as r:
        assert r.status == 200
    proc.send_signal(sig)
    code = proc.wait(30)
    assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    for _ in range(100):
        if not any(_alive(c) for c in children):
            break
        time.sleep(0.1)
    assert [c for c in children if _alive(c)] == []


async def test_a_killed_workers_queue_is_sent_elsewhere(stack, procs, model_dir,
                                                       tmp_path) -> None:
    """SIGKILL, no drain: what it was generating fails fast with a 503 (not a hang until
    the timeout); what waited in its queue is routed to another worker and completes."""
    s = await stack(workers=0)
    proc = await _one_at_a_time_worker(s, procs, model_dir, tmp_path, "doomed")
    async with aiohttp.ClientSession() as http:
        tasks = [asyncio.create_task(_direct(http, s.base_url, i, "doomed")) for i in range(3)]
        await asyncio.sleep(1.0)
        await s.roles.add_workers(1)
        proc.send_signal(signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert sorted(status for status, _ in results) == [200, 200, 503]


async def test_serving_resumes_after_the_nats_server_restarts(stack, nats_server) -> None:
    """Every role reconnects on its own: streams come back from the store, pulls are
    re-issued, registry watches resume, and requests are served again."""
    s = await stack(workers=2)
    async with aiohttp.ClientSession() as http:
        assert (await _chat(http, s.base_url, 1, 4))[:2] == (200, True)
        port = nats_server.port
        nats_server.stop()
        await asyncio.sleep(0.5)
        nats_server.port = port
        nats_server.start()
        ok = None
        for _ in range(150):  # reconnect back-off is 0.5 s; allow a generous margin
            with contextlib.suppress(aiohttp.ClientError):
                ok = await _chat(http, s.base_url, 2, 4)
                if ok[:2] == (200, True):
                    break
            await asyncio.sleep(0.2)
        assert ok is not None and ok[:2] == (200, True)
        # Past the registration TTL: only live watches keep the workers known.
        await asyncio.sleep(3 * s.cfg.worker_ttl)
        results = await asyncio.gather(*(_chat(http, s.base_url, i, 8) for i in range(20)))
    assert [r for r in results if r != (200, True, False)] == []


async def test_a_worker_recreates_its_deleted_consumer(stack) -> None:
    """An operator (or a router sweeping after a false alarm) deletes a worker's queue
    consumer: the worker notices, re-creates it and the queued requests are served."""
    s = await stack(workers=1)
    worker = s.roles.workers[0]
    names = Names(s.cfg.namespace)
    await worker.bus.js.delete_consumer(names.work_stream,
                                        names.worker_consumer(worker.worker_id))
    async with aiohttp.ClientSession() as http:
        results = await asyncio.wait_for(
            asyncio.gather(*(_chat(http, s.base_url, i, 4) for i in range(5))), 30)
    assert results == [(200, True, False)] * 5


async def test_a_request_past_its_deadline_gets_a_504(stack) -> None:
    s = await stack(workers=1, mock_speedup=0.05, request_timeout=1.0)
    async with aiohttp.ClientSession() as http, http.post(
            s.base_url + "/completions",
            json={"model": MODEL, "prompt": "slow", "max_tokens": 500}) as resp:
        err = (await resp.json())["error"]
    assert resp.status == 504 and err["code"] == "timeout"
    worker = s.roles.workers[0]
    for _ in range(100):  # the timeout cancelled it at the worker too
        if not worker._running:
            break
        await asyncio.sleep(0.05)
    assert not worker._running
