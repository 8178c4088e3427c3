"""A response is whole or it fails: token streams across nats-server restarts, a worker
restarted under its own id, a worker frozen past its TTL (every role in its own process
on 127.0.0.1: the deployment of ``bench/faults.py``, with fewer trials; each stream is
compared with an undisturbed run of the same prompt), and a gap nobody can fill."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from bench.faults import Outcome, Settings, run_fault
from dynamo_bus.bus.connection import open_bus
from dynamo_bus.bus.messages import RESPONSE, Chunk, Request, SamplingOptions
from dynamo_bus.bus.registry import Registry
from dynamo_bus.errors import DynamoBusError
from dynamo_bus.models import ModelDir
from dynamo_bus.serving import stream as stream_module
from dynamo_bus.serving.requester import Requester, new_request_id

MODEL = "SmolLM2-135M-Instruct"

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _report(fault: str, engine: str, outs: list[Outcome], gaps: dict[str, int]) -> Counter[str]:
    verdicts = Counter(o.verdict for o in outs)
    print(f"\n{fault} ({engine}): {verdicts['intact']} intact, {verdicts['error']} ended with "
          f"an error, {verdicts['wrong']} silently wrong; gaps {gaps}")
    for o in outs:
        if o.verdict != "intact":
            print(f"  trial {o.trial} stream {o.stream}: {o.verdict} status {o.status} "
                  f"finish {o.finish} tokens {o.tokens} text_ok {o.text_ok} "
                  f"error {o.error} after {o.error_after_s}")
    return verdicts


@pytest.mark.timeout(300)
async def test_streams_across_nats_server_restarts_mock(model_dir: ModelDir,
                                                        tmp_path: Path) -> None:
    s = Settings(engine="mock")  # 8 streams of 1,000 tokens, the restart 2.5 s in
    outs, gaps = await run_fault("nats_restart", 8, s, str(model_dir.path), tmp_path)
    verdicts = _report("nats_restart", "mock", outs, gaps)
    assert verdicts["wrong"] == 0
    # The repair is the point: restarts lose chunks, and the worker sends them again.
    assert verdicts["intact"] >= len(outs) // 2


@pytest.mark.timeout(400)
async def test_streams_across_nats_server_restarts_reference(model_dir: ModelDir,
                                                             tmp_path: Path) -> None:
    s = Settings(engine="reference", streams=4, max_tokens=120, fault_after=2.0)
    outs, gaps = await run_fault("nats_restart", 3, s, str(model_dir.path), tmp_path)
    verdicts = _report("nats_restart", "reference", outs, gaps)
    assert verdicts["wrong"] == 0
    assert verdicts["intact"] >= len(outs) // 2


@pytest.mark.timeout(300)
async def test_a_worker_restarted_under_its_id_fails_its_streams_at_once(
        model_dir: ModelDir, tmp_path: Path) -> None:
    s = Settings(engine="mock", streams=6, max_tokens=300, mock_speedup=0.5, fault_after=1.0)
    outs, gaps = await run_fault("worker_restart", 2, s, str(model_dir.path), tmp_path)
    verdicts = _report("worker_restart", "mock", outs, gaps)
    assert verdicts["wrong"] == 0
    # Half the streams ran on the killed process: they end with an error as soon as the
    # new process registers, long before the work queue would send them again (its ack
    # wait is 30 s). A slow reader meets the error after the text it has not read yet.
    errors = [o for o in outs if o.verdict == "error"]
    assert errors and all("restarted" in (o.error or "") for o in errors)
    assert all(o.error_after_s is not None and o.error_after_s < 15
               for o in errors if not o.slow)
    # The other half waited in its queue: the new process serves them, whole.
    assert verdicts["intact"] >= 2 * (s.streams // 2)


@pytest.mark.timeout(300)
async def test_a_frozen_worker_stops_what_its_frontends_failed(model_dir: ModelDir,
                                                              tmp_path: Path) -> None:
    s = Settings(engine="mock", streams=6, max_tokens=600, ttl=2.0, heartbeat=0.5,
                 fault_after=1.0)
    outs, gaps = await run_fault("worker_stop", 1, s, str(model_dir.path), tmp_path)
    verdicts = _report("worker_stop", "mock", outs, gaps)
    assert verdicts["wrong"] == 0
    assert verdicts["error"] > 0  # the frozen worker's streams
    log = (tmp_path / "w1.log").read_text()
    assert "past its TTL; ending" in log


async def test_a_gap_nobody_can_fill_ends_the_stream_with_a_503(stack, monkeypatch) -> None:
    """The floor: a chunk far past what the worker ever sent opens a gap that no resend
    can fill; the stream ends with an error naming the cause, not a short answer."""
    monkeypatch.setattr(stream_module, "REPAIR_WINDOW", 2.0)
    s = await stack(workers=1, frontend=False, mock_speedup=0.05)
    bus = await open_bus(s.cfg, s.nats_url, name="gap-test")
    registry = Registry(bus, ttl=s.cfg.worker_ttl)
    await registry.start()
    requester = Requester(bus, registry)
    await requester.start()
    try:
        assert await registry.wait_for_worker(MODEL, timeout=10)
        stream = await requester.submit(Request(
            request_id=new_request_id(), model=MODEL, token_ids=[5] * 20, reply_to="",
            sampling=SamplingOptions(max_tokens=400)))
        got = 0
        with pytest.raises(DynamoBusError) as failed:
            async for chunk in stream:
                got += len(chunk.token_ids)
                if got and got < 1000:
                    # What a lost stretch looks like to the requester: tokens from far on.
                    await bus.nc.publish(stream.request.reply_to, RESPONSE.encode(
                        Chunk(request_id=stream.request_id, index=100_000, token_ids=[7])))
                    got = 1000
        assert (failed.value.status, failed.value.code) == (503, "stream_gap")
        assert "lost in transit" in failed.value.message
        assert (requester.gaps_failed, requester.gaps_repaired) == (1, 0)
    finally:
        await requester.stop()
        await registry.stop()
        await bus.close()
