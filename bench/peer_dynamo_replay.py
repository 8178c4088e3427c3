"""NVIDIA Dynamo 1.6.1 offline trace replay, as a peer to our offline router simulator.

Runs Dynamo's own virtual-clock replay (`dynamo.replay.run_trace_replay`, replay_mode
"offline"): its KV router (or round robin) in front of N simulated "mocker" engines, driven by
a Mooncake-format trace. No servers, no network. Prints ONE JSON object to stdout: the args,
the whole summary dict Dynamo returns, and the wall-clock seconds of the replay call.

Runs under the Dynamo peer venv (bench/setup_dynamo_peer.sh), not the project venv:

    DYN_LOG=error .peers/dynamo/bin/python bench/peer_dynamo_replay.py \\
        --trace /work/shared/traces/synthetic_trace.jsonl --workers 4 --num-gpu-blocks 16384 \\
        --router-mode kv_router

Offline replay accepts only router modes "kv_router" and "round_robin" (no "random").
With kv_router, equal-cost workers are picked at random, so repeated runs differ slightly.

Disaggregated replay: give both --prefill-workers P and --decode-workers D (> 0) and the
replay runs P prefill-only and D decode-only mockers (engine "worker_type" "prefill" /
"decode", same engine settings otherwise) instead of --workers aggregated ones.
--kv-transfer-bandwidth (GB/s) and --kv-transfer-bytes-per-token model the prefill->decode KV
transfer delay; they go in the PREFILL engine dict (Dynamo 1.6.1 also accepts them in the
decode dict but ignores them there, checked), and without them there is no delay:

    DYN_LOG=error .peers/dynamo/bin/python bench/peer_dynamo_replay.py \\
        --trace /work/shared/traces/synthetic_trace.jsonl --prefill-workers 4 \\
        --decode-workers 4 --kv-transfer-bandwidth 50 --kv-transfer-bytes-per-token 23040

--host-blocks N adds the native host offload tier (G2) of N blocks per worker, sized with
"kv_cache_bytes_per_token" 23040 (--kv-cache-bytes-per-token).
"""

import argparse
import itertools
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("DYN_LOG", "error")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", required=True, help="Mooncake-format JSONL trace")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--num-gpu-blocks", type=int, default=16384, help="KV blocks per worker")
    p.add_argument("--block-size", type=int, default=16, help="engine KV block size (tokens)")
    p.add_argument("--trace-block-size", type=int, default=512, help="tokens per trace hash_id")
    p.add_argument("--router-mode", choices=["kv_router", "round_robin"], default="kv_router")
    p.add_argument("--max-requests", type=int, default=None, help="replay only the first N")
    p.add_argument("--max-num-seqs", type=int, default=None, help="engine default 256")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="default 8192")
    p.add_argument(
        "--no-chunked-prefill",
        action="store_true",
        help="needs --max-num-batched-tokens >= the longest prompt, or the replay stalls",
    )
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--speedup", type=float, default=None, help="engine speedup_ratio (def. 1)")
    p.add_argument("--arrival-speedup", type=float, default=1.0, help="trace time compression")
    p.add_argument("--router-temperature", type=float, default=None, help="default 0")
    p.add_argument("--overlap-score-weight", type=float, default=None, help="default 1")
    p.add_argument("--kv-event-lag-ms", type=float, default=None, help="default 0 (sync)")
    p.add_argument("--prefill-workers", type=int, default=0, help="disagg: with --decode-workers")
    p.add_argument("--decode-workers", type=int, default=0, help="disagg: with --prefill-workers")
    p.add_argument("--kv-transfer-bandwidth", type=float, default=None, help="GB/s, disagg only")
    p.add_argument("--kv-transfer-bytes-per-token", type=int, default=None, help="disagg only")
    p.add_argument("--host-blocks", type=int, default=None, help="native host offload blocks")
    p.add_argument(
        "--kv-cache-bytes-per-token", type=int, default=23040, help="sizes --host-blocks"
    )
    return p.parse_args(argv)


def disagg(a):
    return a.prefill_workers > 0 and a.decode_workers > 0


def engine_args(a, worker_type=None):
    """{"engine": {...}} for aggregated workers (worker_type None) or one disagg side."""
    engine = {"block_size": a.block_size, "num_gpu_blocks": a.num_gpu_blocks}
    for key, val in (
        ("max_num_seqs", a.max_num_seqs),
        ("max_num_batched_tokens", a.max_num_batched_tokens),
        ("speedup_ratio", a.speedup),
        ("enable_chunked_prefill", False if a.no_chunked_prefill else None),
        ("enable_prefix_caching", False if a.no_prefix_caching else None),
    ):
        if val is not None:
            engine[key] = val
    if a.host_blocks is not None:
        engine["native_host_offload"] = {"num_host_blocks": a.host_blocks}
        engine["kv_cache_bytes_per_token"] = a.kv_cache_bytes_per_token
    if worker_type is not None:
        engine["worker_type"] = worker_type
    if worker_type == "prefill":
        for key, val in (
            ("kv_transfer_bandwidth", a.kv_transfer_bandwidth),
            ("kv_transfer_bytes_per_token", a.kv_transfer_bytes_per_token),
        ):
            if val is not None:
                engine[key] = val
    return {"engine": engine}


def worker_kwargs(a):
    """run_trace_replay worker/engine keywords: aggregated or disaggregated."""
    if disagg(a):
        return {
            "num_prefill_workers": a.prefill_workers,
            "num_decode_workers": a.decode_workers,
            "prefill_engine_args": engine_args(a, "prefill"),
            "decode_engine_args": engine_args(a, "decode"),
        }
    if a.prefill_workers or a.decode_workers:
        sys.exit("--prefill-workers and --decode-workers must both be > 0")
    if a.kv_transfer_bandwidth is not None or a.kv_transfer_bytes_per_token is not None:
        sys.exit("--kv-transfer-* need --prefill-workers and --decode-workers")
    return {"num_workers": a.workers, "extra_engine_args": engine_args(a)}


def router_config(a):
    kw = {
        k: v
        for k, v in (
            ("router_temperature", a.router_temperature),
            ("overlap_score_weight", a.overlap_score_weight),
        )
        if v is not None
    }
    if not kw:
        return None
    from dynamo._core import KvRouterConfig

    return KvRouterConfig(**kw)


def main(argv=None):
    a = parse_args(argv)
    from dynamo.replay import run_trace_replay

    trace, tmp = a.trace, None
    if a.max_requests is not None:
        tmp = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False)
        with open(a.trace) as src, tmp:
            tmp.writelines(itertools.islice(src, a.max_requests))
        trace = tmp.name
    try:
        t0 = time.perf_counter()
        rep = run_trace_replay(
            [trace],
            replay_mode="offline",
            router_mode=a.router_mode,
            trace_block_size=a.trace_block_size,
            arrival_speedup_ratio=a.arrival_speedup,
            **worker_kwargs(a),
            router_config=router_config(a),
            kv_event_lag_ms=a.kv_event_lag_ms,
        )
        wall_s = time.perf_counter() - t0
    finally:
        if tmp is not None:
            os.unlink(tmp.name)
    out = {
        "peer": "dynamo-1.6.1-offline-replay",
        "args": vars(a),
        "engine_args": (
            {k: v for k, v in worker_kwargs(a).items() if k.endswith("engine_args")}
            if disagg(a)
            else engine_args(a)
        ),
        "wall_s": wall_s,
        "summary": dict(rep.summary),
    }
    json.dump(out, sys.stdout, default=str)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
