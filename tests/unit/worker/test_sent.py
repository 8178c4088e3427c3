"""The worker's log of sent chunks: what a requester that lost some gets again."""

from __future__ import annotations

from dynamo_bus.worker.sent import SentLog


def _log() -> SentLog:
    log = SentLog(keep_s=60.0, max_bytes=1 << 20)
    log.open("r1", "reply.r1")
    log.add("r1", 0, 0, b"started")
    log.add("r1", 0, 3, b"t0-2")
    log.add("r1", 3, 2, b"t3-4")
    log.add("r1", 5, 4, b"t5-8")
    return log


def test_sends_again_what_reaches_past_the_position_asked() -> None:
    log = _log()
    assert log.since("r1", 0) == ("reply.r1", [b"started", b"t0-2", b"t3-4", b"t5-8"], False)
    # From inside a chunk: that chunk again (the requester drops the part it has).
    assert log.since("r1", 4) == ("reply.r1", [b"t3-4", b"t5-8"], False)
    assert log.since("r1", 9) == ("reply.r1", [], False)
    assert log.since("other", 0) is None  # not ours: stay silent


def test_a_finished_request_is_kept_and_its_error_always_sent() -> None:
    log = _log()
    log.add("r1", 0, -1, b"error")
    log.close("r1")
    assert log.since("r1", 9) == ("reply.r1", [b"error"], True)


def test_finished_requests_are_forgotten_by_age_and_by_size() -> None:
    log = _log()
    log.close("r1")
    log.keep_s = 0.0
    assert log.since("r1", 0) is None
    log = SentLog(keep_s=60.0, max_bytes=10)
    for rid in ("a", "b", "c"):
        log.open(rid, f"reply.{rid}")
        log.add(rid, 0, 1, b"12345")
        log.close(rid)
    # 15 bytes finished, 10 allowed: the oldest goes first.
    assert log.since("a", 0) is None
    assert log.since("b", 0) is not None and log.since("c", 0) is not None
