"""Offline simulation and traces: virtual time is exact, routing shows in the figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynamo_bus.engines.mock import decode_ms, prefill_ms
from dynamo_bus.errors import ConfigError
from dynamo_bus.hashing import sequence_hashes
from dynamo_bus.traces.mooncake import (
    TraceRequest,
    read_trace,
    reuse_bound,
    synth_tokens,
    write_trace,
)
from dynamo_bus.traces.simulate import SimSettings, simulate


def test_equal_hash_ids_give_equal_tokens_and_blocks() -> None:
    a = synth_tokens(TraceRequest(0, 1200, 1, [7, 8, 9]), 49152)
    b = synth_tokens(TraceRequest(0, 700, 1, [7, 8]), 49152)
    c = synth_tokens(TraceRequest(0, 700, 1, [7, 5]), 49152)
    assert len(a) == 1200 and len(b) == 700 and a.max() < 49152
    assert (a[:700] == b).all() and (a[:512] == c[:512]).all() and (a[512:700] != c[512:]).any()
    ha, hc = sequence_hashes(a, 16), sequence_hashes(c, 16)
    assert ha[:32] == hc[:32] and ha[32] != hc[32]
    with pytest.raises(ConfigError, match="only 1 hash ids"):
        synth_tokens(TraceRequest(0, 600, 1, [1]), 49152)


def test_trace_round_trip_and_cache_bound(tmp_path: Path) -> None:
    reqs = [TraceRequest(0, 1024, 4, [1, 2]), TraceRequest(5, 1100, 4, [1, 2, 3]),
            TraceRequest(9, 1024, 4, [1, 2])]
    path = tmp_path / "t.jsonl"
    assert write_trace(path, reqs) == 3
    assert read_trace(path) == reqs
    # second: 1024 of 1100 reused; third: all but its last block (1008 of 1024)
    assert reuse_bound(reqs) == pytest.approx((1024 + 1008) / (1024 + 1100 + 1024))
    path.write_text('{"timestamp": 0, "input_length": 5}\n')
    with pytest.raises(ConfigError, match=r"t\.jsonl:1"):
        read_trace(path)


def test_virtual_time_is_the_mocker_timing_exactly() -> None:
    # One request alone: TTFT is one prefill step, E2E adds one decode step per token.
    trace = [TraceRequest(0, 512, 3, [1])]
    r = simulate(trace, SimSettings(workers=1, num_blocks=1024))
    assert r.ttft_ms == [pytest.approx(prefill_ms(512))]
    u1, u2 = 513 / (1024 * 16), 514 / (1024 * 16)
    assert r.e2e_ms == [pytest.approx(prefill_ms(512) + decode_ms(u1) + decode_ms(u2))]
    assert r.wall_s < 5


def test_kv_aware_reuses_shared_prefixes_that_round_robin_scatters() -> None:
    # 5 conversations, each resent 6 times with a growing history, interleaved.
    trace = [TraceRequest(100.0 * (turn * 5 + c), 512 * (turn + 2), 8,
                          [1000 * c + k for k in range(turn + 2)])
             for turn in range(6) for c in range(5)]
    kv = simulate(trace, SimSettings(workers=4, num_blocks=4096))
    rr = simulate(trace, SimSettings(workers=4, num_blocks=4096, strategy="round_robin"))
    bound = reuse_bound(trace)
    assert rr.reuse < 0.5 * bound
    assert kv.reuse > 0.95 * bound
    assert sum(kv.ttft_ms) < sum(rr.ttft_ms)


def test_a_disaggregated_request_pays_prefill_transfer_and_onboard_in_virtual_time() -> None:
    from dynamo_bus.engines.mock import HOST_BANDWIDTH, KV_BYTES_PER_TOKEN

    trace = [TraceRequest(0, 2000, 3, [1, 2, 3, 4])]  # 125 full blocks
    s = SimSettings(workers=1, num_blocks=1024, prefill_workers=1, host_blocks=1024,
                    disagg_min_prefill_tokens=1000, transfer_bandwidth=50e9)
    r = simulate(trace, s)
    nbytes = 125 * 16 * KV_BYTES_PER_TOKEN
    floor = prefill_ms(2000) + 1000 * (nbytes / 50e9 + nbytes / HOST_BANDWIDTH)
    # Then the decode worker computes at most one block (a prompt cached whole still
    # computes its last token) before its first token.
    assert floor < r.ttft_ms[0] < floor + prefill_ms(16) + 0.01
    assert r.records[0].worker == "d0" and r.records[0].cached_tokens == 0
    # Below the threshold the decode worker prefills it itself: as one aggregated worker.
    s.disagg_min_prefill_tokens = 4096
    local = simulate(trace, s)
    alone = simulate(trace, SimSettings(workers=1, num_blocks=1024, host_blocks=1024))
    assert local.ttft_ms == alone.ttft_ms and local.e2e_ms == alone.e2e_ms


def test_disaggregated_simulation_needs_host_tiers() -> None:
    with pytest.raises(ConfigError, match="--host-blocks"):
        simulate([TraceRequest(0, 600, 1, [1, 2])], SimSettings(prefill_workers=1))
