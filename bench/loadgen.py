"""Lean async OpenAI-HTTP load generator, plus a ~1,000-token prompt builder.

One aiohttp session, connection limit = concurrency, C coroutines pulling request
indices until N are issued or the wall-clock cap passes.  Per request: TTFT (first
SSE chunk carrying content; streaming only), E2E latency, output tokens (``usage``
when present, else content chunks), error.  A warm-up phase (default 2*C requests,
distinct prompts) runs first and is not measured.  The load generator's own CPU time
(``resource.getrusage``) over the measured phase is reported, because on a 2-core box
it competes with the server under test.

    python bench/loadgen.py --base-url http://127.0.0.1:8000 --model-dir DIR -c 8 -n 200
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

try:  # msgspec is a dynamo-bus dependency; fall back to json elsewhere
    from msgspec.json import decode as _loads
except ImportError:  # pragma: no cover
    _loads = json.loads

# ---------------------------------------------------------------------------- prompts

_WORDS = (
    "time year people way day man thing woman life child world school state family "
    "student group country problem hand part place case week company system program "
    "question work government number night point home water room mother area money "
    "story fact month lot right study book eye job word business issue side kind head "
    "house service friend father power hour game line end member law car city community "
    "name president team minute idea kid body information back parent face others level "
    "office door health person art war history party result change morning reason "
    "research girl guy moment air teacher force education river garden mountain bridge "
    "quickly slowly carefully brightly quietly never often always sometimes together "
    "green blue red small large ancient modern simple complex happy tired strong gentle "
    "run walk think build write read carry open close follow begin remember travel sing "
    "paint listen explain discover imagine gather measure borrow whisper wander shine "
    "under over between through across behind beyond within without around toward "
    "the a of and to in is that for on with as at by from this it an be or are was"
).split()


def _chat_template(model_dir: Path):
    from jinja2 import Environment  # jinja2 comes with transformers / dynamo-bus

    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    tpl = cfg.get("chat_template")
    if isinstance(tpl, list):  # [{"name": "default", "template": ...}]
        tpl = next(t["template"] for t in tpl if t.get("name") == "default")
    if not tpl:
        raise ValueError(f"{model_dir}/tokenizer_config.json has no chat_template")
    env = Environment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = lambda m: (_ for _ in ()).throw(ValueError(m))
    t = env.from_string(tpl)

    def render(text: str) -> str:
        return t.render(
            messages=[{"role": "user", "content": text}],
            add_generation_prompt=True,
            bos_token=cfg.get("bos_token") or "",
            eos_token=cfg.get("eos_token") or "",
        )

    return render


def build_prompts(
    model_dir: str | Path, n: int, target_tokens: int = 1000, seed: int = 0, tolerance: float = 0.05
) -> list[str]:
    """``n`` distinct user messages whose chat-templated form is ``target_tokens`` ±5%
    under the model's own tokenizer.  Request i uses RNG seed (seed, i), so equal
    (seed, i) give equal prompts across systems and runs."""
    from tokenizers import Tokenizer

    model_dir = Path(model_dir)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    render = _chat_template(model_dir)
    overhead = len(tok.encode(render(""), add_special_tokens=False).ids)
    body = target_tokens - overhead
    # every word is >= 1 token, so `body` words always cover `body` tokens; trim by tokens
    texts = []
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        texts.append(f"Request {seed}-{i}. " + " ".join(rng.choices(_WORDS, k=body)))
    encs = tok.encode_batch(texts, add_special_tokens=False)
    out = [t.strip() for t in tok.decode_batch([e.ids[:body] for e in encs])]
    counts = [
        len(c.ids) for c in tok.encode_batch([render(p) for p in out], add_special_tokens=False)
    ]
    bad = [c for c in counts if abs(c - target_tokens) > tolerance * target_tokens]
    if bad:
        raise ValueError(f"{len(bad)} prompts off target {target_tokens}: e.g. {bad[:5]}")
    if len(set(out)) != len(out):
        raise ValueError("prompts are not distinct")
    return out


def templated_token_counts(model_dir: str | Path, prompts: list[str]) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    render = _chat_template(Path(model_dir))
    return [
        len(e.ids) for e in tok.encode_batch([render(p) for p in prompts], add_special_tokens=False)
    ]


# ---------------------------------------------------------------------------- load


@dataclass
class ReqResult:
    ok: bool
    e2e_s: float
    ttft_s: float | None = None
    out_tokens: int = 0
    error: str | None = None
    prompt_tokens: int | None = None  # as the server counted them (usage)
    content_events: int = 0  # SSE events carrying text (streaming): how finely it streamed


@dataclass
class LoadResult:
    concurrency: int
    stream: bool
    requested: int
    completed: int
    errors: int
    wall_s: float
    req_per_s: float
    out_tok_per_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    e2e_p50_ms: float | None
    e2e_p99_ms: float | None
    mean_out_tokens: float
    loadgen_cpu_s: float
    loadgen_cpu_cores: float  # loadgen CPU seconds / wall seconds (1.0 = one full core)
    capped: bool
    server_cpu_cores: float | None = None  # from cpu_probe, same measured window
    other_cpu_cores: float | None = None  # machine busy - server - loadgen (noise)
    mean_prompt_tokens: float | None = None  # server-reported usage.prompt_tokens
    usage_reported: int = 0  # requests whose response carried usage
    mean_content_events: float | None = None  # SSE events with text per request (stream)
    error_samples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine, all cores (from /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / _TICK


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo), for the machine line of a report."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def _one(
    session: aiohttp.ClientSession,
    url: str,
    body: dict,
    stream: bool,
) -> ReqResult:
    t0 = time.perf_counter()
    ttft = None
    chunks = 0
    usage_tokens = None
    prompt_tokens = None
    try:
        async with session.post(url, json=body) as r:
            if r.status != 200:
                txt = (await r.text())[:300]
                return ReqResult(False, time.perf_counter() - t0, error=f"HTTP {r.status}: {txt}")
            if not stream:
                data = _loads(await r.read())
                e2e = time.perf_counter() - t0
                u = data.get("usage") or {}
                n = u.get("completion_tokens")
                if n is None:
                    n = len((data["choices"][0]["message"].get("content") or "").split())
                return ReqResult(True, e2e, out_tokens=int(n), prompt_tokens=u.get("prompt_tokens"))
            done = False
            async for line in r.content:
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                ev = _loads(payload)
                if "error" in ev and not ev.get("choices"):
                    return ReqResult(False, time.perf_counter() - t0, error=str(ev["error"])[:300])
                for ch in ev.get("choices") or ():
                    if (ch.get("delta") or {}).get("content"):
                        chunks += 1
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                u = ev.get("usage")
                if u and u.get("completion_tokens") is not None:
                    usage_tokens = int(u["completion_tokens"])
                    prompt_tokens = u.get("prompt_tokens")
            e2e = time.perf_counter() - t0
            if not done:
                return ReqResult(False, e2e, ttft, chunks, "stream ended without [DONE]")
            return ReqResult(
                True,
                e2e,
                ttft,
                usage_tokens if usage_tokens is not None else chunks,
                prompt_tokens=prompt_tokens,
                content_events=chunks,
            )
    except asyncio.CancelledError:
        raise
    except Exception as e:
        return ReqResult(False, time.perf_counter() - t0, error=f"{type(e).__name__}: {e}"[:300])


async def _phase(
    session,
    url,
    model,
    prompts,
    n,
    conc,
    max_tokens,
    stream,
    cap_s,
    extra_body=None,
) -> tuple[list[ReqResult], float, bool]:
    next_i = 0
    results: list[ReqResult] = []
    deadline = time.perf_counter() + cap_s
    capped = False

    async def worker() -> None:
        nonlocal next_i, capped
        while next_i < n:
            if time.perf_counter() > deadline:
                capped = True
                return
            i = next_i
            next_i += 1
            body = {
                "model": model,
                "max_tokens": max_tokens,
                "stream": stream,
                "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
            }
            if stream:
                body["stream_options"] = {"include_usage": True}
            body.update(extra_body or {})
            results.append(await _one(session, url, body, stream))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    return results, time.perf_counter() - t0, capped


async def run_load(
    base_url: str,
    model: str,
    prompts: list[str],
    concurrency: int,
    requests: int,
    max_tokens: int = 64,
    stream: bool = True,
    warmup: int | None = None,
    warmup_prompts: list[str] | None = None,
    cap_s: float = 60.0,
    request_timeout_s: float = 60.0,
    cpu_probe: Callable[[], float] | None = None,
    machine_busy_s: Callable[[], float] | None = None,
    extra_body: dict | None = None,
) -> LoadResult:
    """Warm up (unmeasured), then send ``requests`` requests at ``concurrency``.
    ``cpu_probe`` (optional) returns the server's cumulative CPU seconds; it is read
    around the measured phase only, as is ``machine_busy_s`` (all CPUs' busy seconds)."""
    url = base_url.rstrip("/") + "/v1/chat/completions"
    warmup = 2 * concurrency if warmup is None else warmup
    conn = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=request_timeout_s)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
        if warmup:
            await _phase(
                s,
                url,
                model,
                warmup_prompts or prompts[::-1],
                warmup,
                concurrency,
                max_tokens,
                stream,
                cap_s,
                extra_body,
            )
        srv0 = cpu_probe() if cpu_probe else 0.0
        busy0 = machine_busy_s() if machine_busy_s else 0.0
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        res, wall, capped = await _phase(
            s, url, model, prompts, requests, concurrency, max_tokens, stream, cap_s, extra_body
        )
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        srv1 = cpu_probe() if cpu_probe else 0.0
        busy1 = machine_busy_s() if machine_busy_s else 0.0
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    ok = [r for r in res if r.ok]
    errs = [r for r in res if not r.ok]
    ttfts = [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]
    e2es = [r.e2e_s * 1e3 for r in ok]
    toks = sum(r.out_tokens for r in ok)
    pts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    return LoadResult(
        concurrency=concurrency,
        stream=stream,
        requested=requests,
        completed=len(ok),
        errors=len(errs),
        wall_s=wall,
        req_per_s=len(ok) / wall if wall else 0.0,
        out_tok_per_s=toks / wall if wall else 0.0,
        ttft_p50_ms=_pct(ttfts, 0.5),
        ttft_p99_ms=_pct(ttfts, 0.99),
        e2e_p50_ms=_pct(e2es, 0.5),
        e2e_p99_ms=_pct(e2es, 0.99),
        mean_out_tokens=statistics.fmean([r.out_tokens for r in ok]) if ok else 0.0,
        loadgen_cpu_s=cpu,
        loadgen_cpu_cores=cpu / wall if wall else 0.0,
        capped=capped,
        error_samples=[e.error or "" for e in errs[:5]],
        server_cpu_cores=(srv1 - srv0) / wall if cpu_probe and wall else None,
        other_cpu_cores=max(0.0, (busy1 - busy0) - (srv1 - srv0) - cpu) / wall
        if machine_busy_s and cpu_probe and wall
        else None,
        mean_prompt_tokens=statistics.fmean(pts) if pts else None,
        usage_reported=len(pts),
        mean_content_events=statistics.fmean([r.content_events for r in ok])
        if ok and stream else None,
    )


async def first_model(base_url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(base_url.rstrip("/") + "/v1/models") as r:
        return (await r.json())["data"][0]["id"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", help="served model name (default: first of /v1/models)")
    ap.add_argument("--model-dir", required=True, help="dir with tokenizer.json")
    ap.add_argument("-c", "--concurrency", type=int, default=8)
    ap.add_argument("-n", "--requests", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--unary", action="store_true")
    ap.add_argument("--cap-s", type=float, default=60.0)
    a = ap.parse_args()
    prompts = build_prompts(a.model_dir, a.requests, a.prompt_tokens, seed=1)
    warm = build_prompts(a.model_dir, 2 * a.concurrency, a.prompt_tokens, seed=0)

    async def go() -> LoadResult:
        model = a.model or await first_model(a.base_url)
        return await run_load(
            a.base_url,
            model,
            prompts,
            a.concurrency,
            a.requests,
            a.max_tokens,
            not a.unary,
            warmup_prompts=warm,
            cap_s=a.cap_s,
        )

    print(json.dumps(asyncio.run(go()).as_dict(), indent=1))


if __name__ == "__main__":
    main()
