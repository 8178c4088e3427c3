"""A response is whole or it fails: token streams across nats-server restarts, a worker
restarted under its own id, a worker killed, a worker frozen past its TTL. Every role runs
in its own process on 127.0.0.1 (the deployment of ``bench/faults.py``, with fewer trials);
each stream is compared with an undisturbed run of the same prompt."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from bench.faults import Outcome, Settings, run_fault
from dynamo_bus.models import ModelDir

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
