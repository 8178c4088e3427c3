#!/usr/bin/env python3
"""Engine throughput: the reference engine against HF transformers ``generate`` and vLLM.

One run measures, per dtype (bfloat16, float32), each system in a process of its own on
the same weights and the same number of threads:

* ``reference``: dynamo-bus's engine through its public ``generate`` API (scheduler,
  continuous batching and sampling included);
* ``hf``: transformers ``AutoModelForCausalLM.generate`` (greedy, KV cache on);
* ``vllm``: vLLM's offline ``LLM.generate`` (``bench/peer_vllm.py`` in the venv made by
  ``bench/setup_vllm_peer.sh``; skipped with a note when that venv is missing);
* ``reference-eager`` (``--device cuda``): the reference engine without CUDA graphs.

Method, identical for the three (see bench/peer_vllm.py):
  decode at batch B: t_full = wall time to generate decode_tokens + 1 tokens for B
  distinct random prompts of prompt_len tokens (greedy, EOS ignored), t_first = wall
  time for 1 token of B other prompts; tok/s = B * decode_tokens / (t_full - t_first).
  prefill: one prefill_len-token prompt, 1 output token: prefill_len / t.
  Medians over --repeats; every prompt is fresh, so no prefix cache helps.
  --rounds N runs the systems in turn N times (A B C A B C ...), so a slow minute on a
  shared machine hits all of them; each cell is the median over rounds, and each ratio
  the median of the per-round ratios.

    python bench/engine_throughput.py [--repeats 3] [--dtypes bfloat16,float32]
    python bench/engine_throughput.py --device cuda --systems reference,reference-eager,hf \
        --batches 1,8,32,64 --dtypes bfloat16 --out-name engine_throughput_cuda

Results go to bench/results/engine_throughput.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
VLLM_PY = ROOT / ".peers" / "vllm" / "bin" / "python"
TOKEN_LO, TOKEN_HI = 100, 49000


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", choices=["reference", "reference-eager", "hf"],
                   help="(internal) measure one system in this process and print JSON")
    p.add_argument("--model", help="HF-format model directory (default: SmolLM2, made "
                                   "in bench/.runs/models with the dtype's weights)")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--systems", default="reference,hf,vllm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda (reference and hf)")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1,
                   help="run the systems in turn this many times")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-name", default="engine_throughput")
    p.add_argument("--report-only", action="store_true",
                   help="re-render the markdown from bench/results/<out-name>.json")
    return p.parse_args(argv)


class Prompts:
    """Fresh random prompts from a seeded generator: no two sequences share a prefix."""

    def __init__(self, seed: int) -> None:
        import numpy as np

        self.rng = np.random.default_rng(seed)

    def __call__(self, n: int, length: int) -> list[list[int]]:
        return self.rng.integers(TOKEN_LO, TOKEN_HI, size=(n, length)).tolist()


def _measure(a: argparse.Namespace, run: Any) -> dict[str, Any]:
    """``run(prompts, max_tokens) -> seconds`` for each shape; the shared method."""
    prompts = Prompts(a.seed)
    out: dict[str, Any] = {"decode": {}, "prefill": {}}
    for b in [int(x) for x in a.batches.split(",")]:
        run(prompts(b, a.prompt_len), a.decode_tokens + 1)  # warm-up
        runs = []
        for _ in range(a.repeats):
            t_full = run(prompts(b, a.prompt_len), a.decode_tokens + 1)
            t_first = run(prompts(b, a.prompt_len), 1)
            runs.append({"t_full": t_full, "t_first": t_first,
                         "tok_s": b * a.decode_tokens / (t_full - t_first)})
        out["decode"][str(b)] = {"tok_s": statistics.median(r["tok_s"] for r in runs),
                                 "runs": runs}
    run(prompts(1, a.prefill_len), 1)
    runs = []
    for _ in range(a.repeats):
        t = run(prompts(1, a.prefill_len), 1)
        runs.append({"t": t, "tok_s": a.prefill_len / t})
    out["prefill"][str(a.prefill_len)] = {"tok_s": statistics.median(r["tok_s"] for r in runs),
                                          "runs": runs}
    return out


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_reference(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from dynamo_bus.bus.messages import SamplingOptions
    from dynamo_bus.engines.base import EngineRequest
    from dynamo_bus.engines.reference.engine import ReferenceEngine
    from dynamo_bus.models.modeldir import load_model_dir

    model = load_model_dir(Path(a.model))
    max_b = max(int(x) for x in a.batches.split(","))

    async def main() -> dict[str, Any]:
        started = time.perf_counter()
        eng = ReferenceEngine(model, dtype=a.dtype, device=a.device, threads=a.threads,
                              max_num_seqs=max(64, max_b),
                              max_num_batched_tokens=max(1024, a.prefill_len),
                              cuda_graphs=a.system != "reference-eager")
        await eng.start()
        load_s = time.perf_counter() - started
        counter = iter(range(10**9))

        async def one(ids: list[int], n: int) -> None:
            sampling = SamplingOptions(max_tokens=n, temperature=0.0, ignore_eos=True)
            got = 0
            async for out in eng.generate(EngineRequest(f"r{next(counter)}", ids, sampling)):
                got += len(out.token_ids)
            assert got == n, (got, n)

        loop = asyncio.get_running_loop()

        async def batch(prompts: list[list[int]], n: int) -> None:
            await asyncio.wait_for(asyncio.gather(*(one(p, n) for p in prompts)), 600)

        def run(prompts: list[list[int]], n: int) -> float:
            t = time.perf_counter()
            asyncio.run_coroutine_threadsafe(batch(prompts, n), loop).result()
            return time.perf_counter() - t

        results = await asyncio.to_thread(_measure, a, run)
        await eng.stop()
        return {"load_s": load_s, **results}

    res = asyncio.run(main())
    return {"system": a.system, "torch": torch.__version__, **res}


def run_hf(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    started = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).eval()
    hf.to(a.device)
    load_s = time.perf_counter() - started

    def run(prompts: list[list[int]], n: int) -> float:
        ids = torch.tensor(prompts, device=a.device)
        t = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
            out = out.cpu()  # waits for the device
        el = time.perf_counter() - t
        assert out.shape[1] == ids.shape[1] + n
        return el

    return {"system": "hf", "transformers": transformers.__version__,
            "torch": torch.__version__, "load_s": load_s, **_measure(a, run)}


def model_for(dtype: str) -> Path:
    """SmolLM2 with ``dtype`` weights in a directory of the benchmark's own."""
    from dynamo_bus.models.modeldir import resolve_model
    from dynamo_bus.models.weights import ensure_weights

    src = resolve_model(None, progress=True)
    dest = ROOT / "bench" / ".runs" / "models" / f"{src.name}-{dtype}"
    if not dest.exists():
        shutil.copytree(src.path, dest, ignore=shutil.ignore_patterns("model.safetensors"))
    ensure_weights(dataclasses.replace(src, path=dest), dtype, progress=True)
    return dest


def _child(system: str, a: argparse.Namespace, model: Path, dtype: str) -> dict[str, Any]:
    common = ["--model", str(model), "--dtype", dtype, "--threads", str(a.threads),
              "--batches", a.batches, "--prompt-len", str(a.prompt_len),
              "--decode-tokens", str(a.decode_tokens), "--prefill-len", str(a.prefill_len),
              "--repeats", str(a.repeats), "--seed", str(a.seed)]
    if a.device != "cpu":
        common += ["--device", a.device]
    if system == "vllm":
        if not VLLM_PY.exists():
            return {"system": "vllm", "error": "no .peers/vllm (bash bench/setup_vllm_peer.sh)"}
        cmd = [str(VLLM_PY), str(ROOT / "bench" / "peer_vllm.py"), *common]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--system", system, *common]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
    print(f"engine_throughput: {system} {dtype} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    # The child prints one JSON document (perhaps indented) after anything else.
    start = proc.stdout.find("\n{") + 1 if not proc.stdout.startswith("{") else 0
    try:
        res, _ = json.JSONDecoder().raw_decode(proc.stdout[start:])
    except json.JSONDecodeError:
        res = {"system": system, "error": f"exit {proc.returncode}, no JSON"}
    res["wall_s"] = round(time.perf_counter() - started, 1)
    return res


def _values(r: dict[str, Any], a: argparse.Namespace) -> list[float]:
    """Decode tok/s per batch, then prefill tok/s."""
    return ([r["decode"][b]["tok_s"] for b in a.batches.split(",")]
            + [r["prefill"][str(a.prefill_len)]["tok_s"]])


def _merge_rounds(rounds: list[dict[str, Any]], a: argparse.Namespace) -> dict[str, Any]:
    """One system's rounds as one result: medians per cell, the rounds kept."""
    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return rounds[0]
    merged = dict(ok[0], rounds=[_values(r, a) for r in ok], errors=len(rounds) - len(ok))
    merged["decode"] = {b: {"tok_s": statistics.median(r["decode"][b]["tok_s"] for r in ok)}
                        for b in a.batches.split(",")}
    pl = str(a.prefill_len)
    merged["prefill"] = {pl: {"tok_s": statistics.median(r["prefill"][pl]["tok_s"] for r in ok)}}
    merged["load_s"] = statistics.median(r["load_s"] for r in ok)
    merged["peak_rss_mib"] = max(r.get("peak_rss_mib", 0) for r in ok)
    return merged


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:,.1f}"


Runs = dict[str, dict[str, dict[str, Any]]]


def report(a: argparse.Namespace, runs: Runs) -> str:
    batches = a.batches.split(",")
    cols = [f"decode B={b}" for b in batches] + [f"prefill {a.prefill_len}"]
    lines = [
        f"# Engine throughput: reference engine vs HF transformers vs vLLM ({a.device})", "",
        f"`python bench/engine_throughput.py --repeats {a.repeats} --rounds {a.rounds} "
        f"--dtypes {a.dtypes}"
        + (f" --device {a.device} --systems {a.systems} --batches {a.batches}"
           if a.device != "cpu" else "") + "` — "
        f"{time.strftime('%Y-%m-%d')}, {platform.node() or 'host'}: "
        f"{os.cpu_count()} cores ({platform.processor() or platform.machine()})"
        + (f", {_gpu_name()}" if a.device != "cpu" else "") + ", "
        f"{a.threads} threads per system, each system in its own process, one after the "
        f"other, {a.rounds} round(s) in turn in one run.", "",
        f"Decode: tokens/s at batch B (prompts of {a.prompt_len} tokens, {a.decode_tokens} "
        "decoded tokens, prefill time subtracted); prefill: tokens/s for one "
        f"{a.prefill_len}-token prompt. Medians of {a.repeats} repeats (and over rounds; "
        "a ratio is the median of the per-round ratios); fresh random prompts, greedy, "
        "EOS ignored.", ""]
    for dtype, by_sys in runs.items():
        lines += [f"## {dtype}", "", "| system | " + " | ".join(cols)
                  + " | load s | peak RSS MiB |", "|---|" + "---:|" * (len(cols) + 2)]

        def vals(r: dict[str, Any]) -> list[float | None]:
            return [None] * len(cols) if "error" in r else list(_values(r, a))

        for name, r in by_sys.items():
            note = f" ({r['error']})" if "error" in r else ""
            lines.append(f"| {name}{note} | " + " | ".join(_fmt(v) for v in vals(r))
                         + f" | {_fmt(r.get('load_s'))} | {_fmt(r.get('peak_rss_mib'))} |")
        ref = by_sys.get("reference")
        for base in ("hf", "vllm", "reference-eager"):
            if ref and base in by_sys and "error" not in ref and "error" not in by_sys[base]:
                other = by_sys[base]
                if "rounds" in ref and "rounds" in other:
                    pairs = list(zip(ref["rounds"], other["rounds"], strict=False))
                    ratio = [statistics.median(r[i] / o[i] for r, o in pairs)
                             for i in range(len(cols))]
                else:
                    ratio = [x / y for x, y in zip(vals(ref), vals(other), strict=True)
                             if x and y]
                lines.append(f"| **reference ÷ {base}** | "
                             + " | ".join(f"**{v:.2f}x**" for v in ratio) + " | | |")
        lines.append("")
    lines += ["Peak RSS: the whole process (reference: model and its preallocated KV cache, "
              "1 GiB by default; vLLM: its three processes summed, 2 GiB KV space; HF: a "
              "cache that grows with the sequences). Load: construction to ready (vLLM "
              "compiles its graph with torch.compile each start).", ""]
    return "\n".join(lines)


def main() -> None:
    a = _args()
    if a.system:
        a.model = a.model or str(model_for(a.dtype))
        res = run_hf(a) if a.system == "hf" else run_reference(a)
        res.update(dtype=a.dtype, threads=a.threads, peak_rss_mib=round(_rss_mib(), 1))
        print(json.dumps(res))
        return
    runs: Runs
    if a.report_only:
        runs = json.loads((RESULTS / f"{a.out_name}.json").read_text())
        (RESULTS / f"{a.out_name}.md").write_text(report(a, runs) + "\n")
        return
    runs = {}
    for dtype in a.dtypes.split(","):
        model = Path(a.model) if a.model else model_for(dtype)
        systems = a.systems.split(",")
        rounds: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
        for _ in range(a.rounds):
            for s in systems:
                rounds[s].append(_child(s, a, model, dtype))
        runs[dtype] = {s: _merge_rounds(rs, a) for s, rs in rounds.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{a.out_name}.json").write_text(json.dumps(runs, indent=1) + "\n")
    text = report(a, runs)
    (RESULTS / f"{a.out_name}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
