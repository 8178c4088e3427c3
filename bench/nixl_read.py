#!/usr/bin/env python3
"""NIXL READ of KV blocks between two processes, against a memcpy of the same bytes in
one process: what a decode worker pays to pull a prefilled prompt's KV.

A lender process allocates a host tier of ``--slots`` blocks of SmolLM2's layout (30
layers x 16 tokens x K/V x 3 heads x 64, ``--dtype``), fills each block with its own
byte pattern and registers it with a NIXL agent (UCX: ``UCX_TLS=self,sm``,
``UCX_NET_DEVICES=lo``, no progress thread), as ``PagedKVEngine.open_transfers`` does.
The reader, this process, holds a registered buffer of its own and, per request, READs
N blocks from random lender slots into its first N blocks in one transfer: descriptor
lists built, transfer posted, polled to done, handle released (what
``pull_host_blocks`` does per request), then checks every block's pattern. The
baseline, alternating with it: libc ``memcpy`` of the same number of bytes between two
written buffers in this process (one thread, as UCX's shared-memory copy is), and
beside it torch's ``copy_`` (as many threads as cores). Reported per N (64 and 512 by
default): the medians as GiB/s, the ratio to memcpy (goal >= 0.5), and the request
latency p50/p99.

    python bench/nixl_read.py [--requests 40] [--dtype bfloat16]

Results go to bench/results/nixl_read.{md,json}.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
LAYERS, BLOCK, KV_HEADS, HEAD_DIM = 30, 16, 3, 64  # SmolLM2-135M


def block_elems() -> int:
    return LAYERS * BLOCK * 2 * KV_HEADS * HEAD_DIM


def buffer(slots: int, dtype: str) -> Any:
    import torch

    return torch.empty((slots, block_elems()), dtype=getattr(torch, dtype))


def lender(args: argparse.Namespace) -> None:
    """The other process: a registered host tier; prints its agent metadata and base
    address (hex, one JSON line), then serves READs until its stdin closes."""
    import torch

    from dynamo_bus.kvbm.nixl import ucx_agent

    data = buffer(args.slots, args.dtype)
    raw = data.view(torch.uint8).view(args.slots, -1)
    for s in range(args.slots):
        raw[s].fill_(s % 251)
    agent = ucx_agent("lender")
    agent.register_memory([(data.data_ptr(), raw.numel(), 0, "")], "DRAM")
    print(json.dumps({"metadata": bytes(agent.get_agent_metadata()).hex(),
                      "base": data.data_ptr(), "block_bytes": raw.shape[1]}), flush=True)
    sys.stdin.read()


def reader(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from dynamo_bus.kvbm.nixl import run_transfer, ucx_agent

    proc = subprocess.Popen([sys.executable, __file__, "--lender", "--slots", str(args.slots),
                             "--dtype", args.dtype], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        peer = json.loads(proc.stdout.readline())
        size, base = peer["block_bytes"], peer["base"]
        most = max(args.blocks)
        local = buffer(most, args.dtype).view(torch.uint8).view(most, -1)
        agent = ucx_agent("reader")
        agent.register_memory([(local.data_ptr(), local.numel(), 0, "")], "DRAM")
        agent.add_remote_agent(bytes.fromhex(peer["metadata"]))
        src = torch.randint(0, 256, (most * size,), dtype=torch.uint8)
        dst = torch.zeros_like(src)
        libc = ctypes.CDLL(None)
        libc.memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        rng = random.Random(11)
        out: dict[str, Any] = {"block_bytes": size}
        for n in args.blocks:
            nixl, memcpy, copy = [], [], []
            for i in range(args.requests + 1):  # the first of each is a warm-up
                slots = rng.sample(range(args.slots), n)
                local.zero_()
                t0 = time.perf_counter()
                run_transfer(agent, "READ",
                             agent.get_xfer_descs([(local[j].data_ptr(), size, 0)
                                                   for j in range(n)], "DRAM"),
                             agent.get_xfer_descs([(base + s * size, size, 0) for s in slots],
                                                  "DRAM"), "lender")
                took = time.perf_counter() - t0
                got = local[:n, 0].tolist(), local[:n, -1].tolist()
                want = [s % 251 for s in slots]
                assert got == (want, want), "a block came back with another block's bytes"
                t0 = time.perf_counter()
                libc.memcpy(dst.data_ptr(), src.data_ptr(), n * size)
                t1 = time.perf_counter()
                dst[:n * size].copy_(src[:n * size])
                if i:
                    nixl.append(took)
                    memcpy.append(t1 - t0)
                    copy.append(time.perf_counter() - t1)
            nbytes = n * size
            row = {"bytes": nbytes, "nixl_gib_s": nbytes / statistics.median(nixl) / 2**30,
                   "memcpy_gib_s": nbytes / statistics.median(memcpy) / 2**30,
                   "copy_gib_s": nbytes / statistics.median(copy) / 2**30,
                   "p50_ms": statistics.median(nixl) * 1e3,
                   "p99_ms": statistics.quantiles(nixl, n=100)[98] * 1e3}
            row["ratio"] = row["nixl_gib_s"] / row["memcpy_gib_s"]
            out[str(n)] = row
            print(f"{n} blocks ({nbytes / 2**20:.0f} MiB): NIXL READ {row['nixl_gib_s']:.2f} "
                  f"GiB/s, memcpy {row['memcpy_gib_s']:.2f} ({row['ratio']:.2f}x), torch "
                  f"copy_ {row['copy_gib_s']:.2f}; "
                  f"p50 {row['p50_ms']:.2f} ms p99 {row['p99_ms']:.2f} ms", flush=True)
        return out
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=30)


def write(out: Path, args: argparse.Namespace, res: dict[str, Any]) -> None:
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    lines = ["# NIXL READ of KV blocks between two processes against memcpy", "",
             f"Command: `python bench/nixl_read.py --requests {args.requests} --dtype "
             f"{args.dtype}` · {datetime.now(UTC):%Y-%m-%d %H:%M} UTC · git {commit} · "
             f"{platform.machine()}, {os.cpu_count()} cores, no GPU.", "",
             f"SmolLM2-135M blocks ({args.dtype}, {res['block_bytes'] / 1024:.0f} KiB each) "
             f"from random slots of a {args.slots}-block host tier in another process, "
             "read over NIXL (UCX, `UCX_TLS=self,sm`, loopback, no progress thread) in "
             "one transfer per request, descriptor lists and handle included; against "
             "libc `memcpy` of the same bytes between two written buffers in one process "
             "(one thread), and torch's `copy_` (a thread per core) beside it. Medians "
             f"over {args.requests} requests each, alternating, after a warm-up.", "",
             "| blocks | MiB | NIXL READ GiB/s | memcpy GiB/s | ratio to memcpy | "
             "torch copy_ GiB/s | request p50 ms | request p99 ms |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in args.blocks:
        r = res[str(n)]
        lines.append(f"| {n} | {r['bytes'] / 2**20:.0f} | {r['nixl_gib_s']:.2f} | "
                     f"{r['memcpy_gib_s']:.2f} | **{r['ratio']:.2f}x** | "
                     f"{r['copy_gib_s']:.2f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"commit": commit, **res}, indent=1) + "\n")
    print(f"wrote {out.with_suffix('.md')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=lambda s: [int(x) for x in s.split(",")],
                    default=[64, 512])
    ap.add_argument("--slots", type=int, default=2048, help="the lender's host tier")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--lender", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "nixl_read"))
    args = ap.parse_args()
    os.environ.setdefault("UCX_TLS", "self,sm")  # loopback shared memory only
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    if args.lender:
        lender(args)
        return
    write(Path(args.out), args, reader(args))


if __name__ == "__main__":
    main()
