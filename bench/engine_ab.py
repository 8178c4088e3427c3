#!/usr/bin/env python3
"""The reference engine at two commits, side by side: a regression check for changes
inside the engine (KV pool layout, attention, scheduler).

Each round runs both trees in turn (base first in odd rounds, this tree first in even
ones), each in a process of its own
on the same weights: a 2,048-token prefill (seconds), and decode at batch 8 and 32
(tokens/s: B * 64 tokens over the time of 65 tokens less the time of 1, so prefill is
not counted). Fresh random prompts each time; no prefix cache helps. The base tree is a
``git worktree`` of ``--base`` in a temporary directory, removed afterwards. Reported:
the median over rounds of each figure and of the per-round ratio (this tree / base).

    python bench/engine_ab.py --base HEAD~1 [--rounds 3] [--dtypes float32,bfloat16]

Results go to bench/results/engine_ab.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIGURES = {"prefill2048_s": False, "decode8_tok_s": True, "decode32_tok_s": True}  # higher better?


async def measure(dtype: str, seed: int) -> dict[str, float]:
    """One tree's figures (run with that tree first on sys.path)."""
    from dynamo_bus.bus.messages import SamplingOptions
    from dynamo_bus.engines.base import EngineRequest
    from dynamo_bus.engines.reference.engine import ReferenceEngine
    from dynamo_bus.models.modeldir import resolve_model

    async def gen(eng: Any, rid: str, ids: list[int], n: int) -> None:
        async for _ in eng.generate(EngineRequest(rid, ids, SamplingOptions(
                max_tokens=n, temperature=0, ignore_eos=True))):
            pass

    rng = random.Random(seed)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, 40000) for _ in range(n)]

    eng = ReferenceEngine(resolve_model(None), dtype=dtype, device="cpu", num_blocks=4096,
                          host_gib=0)
    await eng.start()
    try:
        t0 = time.perf_counter()
        await gen(eng, "prefill", prompt(2048), 1)
        res = {"prefill2048_s": time.perf_counter() - t0}
        for b in (8, 32):
            t0 = time.perf_counter()
            await asyncio.gather(*[gen(eng, f"d{b}-{i}", prompt(32), 65) for i in range(b)])
            full = time.perf_counter() - t0
            t0 = time.perf_counter()
            await asyncio.gather(*[gen(eng, f"f{b}-{i}", prompt(32), 1) for i in range(b)])
            res[f"decode{b}_tok_s"] = b * 64 / (full - (time.perf_counter() - t0))
    finally:
        await eng.stop()
    return res


def run_tree(tree: Path, dtype: str, seed: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--measure", str(tree), "--dtype", dtype,
         "--seed", str(seed)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="HEAD~1", help="the commit to compare against")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "engine_ab"))
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one tree's figures
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        sys.path.insert(0, args.measure)
        import dynamo_bus

        assert dynamo_bus.__file__ and dynamo_bus.__file__.startswith(args.measure), (
            f"measuring {args.measure} but imported {dynamo_bus.__file__}")
        print(json.dumps(asyncio.run(measure(args.dtype, args.seed))))
        return

    base = git("rev-parse", "--short", args.base)
    head = git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain",
                                                                  "--untracked-files=no")
                                                  else "")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "base"
        git("worktree", "add", "--detach", str(tree), base)
        try:
            for dtype in args.dtypes.split(","):
                rounds = []
                for r in range(args.rounds):
                    seed = 1000 * r + 7
                    if r % 2:  # the order alternates: neither tree always goes first
                        b = run_tree(ROOT, dtype, seed)
                        a = run_tree(tree, dtype, seed)
                    else:
                        a = run_tree(tree, dtype, seed)
                        b = run_tree(ROOT, dtype, seed)
                    rounds.append({"base": a, "head": b})
                    print(f"{dtype} round {r + 1}: base {a} this {b}", flush=True)
                results[dtype] = rounds
        finally:
            git("worktree", "remove", "--force", str(tree))
    write(Path(args.out), args, base, head, results)


def write(out: Path, args: argparse.Namespace, base: str, head: str,
          results: dict[str, Any]) -> None:
    def med(rounds: list[dict[str, Any]], side: str, key: str) -> float:
        return statistics.median(r[side][key] for r in rounds)

    def ratio(rounds: list[dict[str, Any]], key: str) -> float:
        # For seconds lower is better: the ratio is base / this, so > 1 is faster here too.
        return statistics.median(
            r["head"][key] / r["base"][key] if FIGURES[key] else
            r["base"][key] / r["head"][key] for r in rounds)

    lines = [f"# The reference engine at {head} against {base}", "",
             f"Command: `python bench/engine_ab.py --base {args.base} --rounds {args.rounds} "
             f"--dtypes {args.dtypes}` · {datetime.now(UTC):%Y-%m-%d %H:%M} UTC · "
             f"{platform.machine()}, CPU, {args.rounds} rounds (the two trees in turn, "
             "which goes first alternating, each in its own process).", "",
             "Prefill: one 2,048-token prompt, seconds. Decode: tokens/s at batch 8 and 32 "
             "(64 tokens each, prefill time subtracted). Medians over rounds; the speed "
             "ratio is the median of per-round ratios (> 1: this tree is faster).", "",
             "| dtype | figure | base | this tree | speed ratio |", "|---|---|---:|---:|---:|"]
    for dtype, rounds in results.items():
        for key in FIGURES:
            lines.append(f"| {dtype} | {key} | {med(rounds, 'base', key):.2f} | "
                         f"{med(rounds, 'head', key):.2f} | **{ratio(rounds, key):.2f}x** |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"base": base, "head": head, "rounds": results}, indent=1) + "\n")
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
