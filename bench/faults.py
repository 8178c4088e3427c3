"""What a streaming client sees when something fails mid-answer: the fault table.

Each trial starts ``--streams`` streaming completions (greedy, ``ignore_eos``, with
logprobs, half of them read slowly) on a deployment of separate processes on 127.0.0.1
(nats-server, router, worker(s), frontend), injects one fault while they run, and sorts
every stream against an undisturbed run of the same prompt:

* intact: HTTP 200, finish ``length``, one logprobs entry per token asked for (no gap,
  no duplicate) and, on the mock engine, exactly the undisturbed text;
* ended with an error: an HTTP error status or an OpenAI error event (time to error is
  measured from the fault);
* silently wrong: anything else (the goal is none).

Faults: ``nats_restart`` (SIGTERM to the nats-server, restarted on the same port and
store), ``worker_restart`` (kill -9, and a new process under the same ``--worker-id``
at once), ``worker_kill`` (kill -9; a second worker stays), ``worker_stop`` (SIGSTOP
past the worker's TTL, then SIGCONT; a second worker stays).

    .venv/bin/python bench/faults.py       # every fault on the mock engine, 10 trials each,
                                           # and nats_restart on the reference engine, 3

Writes ``bench/results/faults.{md,json}`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from dynamo_bus.bus.natsserver import EmbeddedNats
from dynamo_bus.models import resolve_model

ROOT = Path(__file__).resolve().parents[1]
MODEL = "SmolLM2-135M-Instruct"
FAULTS = ("nats_restart", "worker_restart", "worker_kill", "worker_stop")
_SERVING = re.compile(r"frontend serving .* at (http://127\.0\.0\.1:\d+/v1)")


@dataclass
class Settings:
    engine: str = "mock"
    streams: int = 8
    max_tokens: int = 1000
    mock_speedup: float = 1.0    # 1,000 tokens take ~6 s on the mock engine
    fault_after: float = 2.5     # seconds into the streams
    heartbeat: float = 1.0
    ttl: float = 5.0
    nats_pause: float = 0.5      # seconds the nats-server is down
    stop_for: float = 0.0        # worker_stop: frozen this long (0: twice the TTL)
    slow_reader: float = 0.02    # seconds a slow reader waits between events


@dataclass
class Outcome:
    fault: str
    trial: int
    stream: int
    slow: bool = False           # read slowly (every other stream)
    verdict: str = ""            # intact | error | wrong
    status: int = 0
    finish: str | None = None
    tokens: int = 0
    text_ok: bool = False
    error: str | None = None
    error_after_s: float | None = None


@dataclass
class Deployment:
    """Every role its own process, all on 127.0.0.1; ``close`` ends each by PID."""

    dir: Path
    model_dir: str
    s: Settings
    workers: tuple[str, ...] = ("w1",)
    capacity: int = 64
    nats: EmbeddedNats | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    base_url: str = ""
    expected_dead: set[str] = field(default_factory=set)  # killed on purpose

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "dynamo_bus.cli", *args],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
        self.procs[name] = proc
        return proc

    def _common(self) -> list[str]:
        assert self.nats is not None
        return ["--nats-url", self.nats.url, "--model", self.model_dir,
                "--heartbeat-interval", str(self.s.heartbeat), "--worker-ttl", str(self.s.ttl)]

    def start_worker(self, wid: str) -> None:
        self._spawn(wid, "worker", *self._common(), "--worker-id", wid, "--engine",
                    self.s.engine, "--mock-speedup", str(self.s.mock_speedup),
                    "--max-concurrency", str(self.capacity), "--threads", "1")

    async def start(self) -> None:
        self.nats = EmbeddedNats(self.dir / "js", log_file=self.dir / "nats.log")
        self.nats.start()
        self._spawn("router", "router", *self._common())
        for wid in self.workers:
            self.start_worker(wid)
        self._spawn("frontend", "frontend", *self._common(), "--http-port", "0")
        self.base_url = await self._wait_for(lambda: _SERVING.search(self._log("frontend")))
        await self.wait_for_workers(set(self.workers))

    def _log(self, name: str) -> str:
        return (self.dir / f"{name}.log").read_text(errors="replace")

    async def _wait_for(self, probe, timeout: float = 120.0):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None and name not in self.expected_dead:
                    raise RuntimeError(f"{name} exited:\n{self._log(name)[-2000:]}")
            found = probe()
            if found:
                return found.group(1) if isinstance(found, re.Match) else found
            await asyncio.sleep(0.1)
        raise TimeoutError("the deployment did not come up")

    async def wait_for_workers(self, ids: set[str]) -> None:
        async def ready() -> bool:
            try:
                async with aiohttp.ClientSession() as http, \
                        http.get(self.base_url.removesuffix("/v1") + "/health") as r:
                    body = await r.json()
            except (aiohttp.ClientError, ValueError):
                return False
            return ids <= {w["worker_id"] for w in body["workers"] if not w["draining"]}

        deadline = time.monotonic() + 120
        while not await ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers {sorted(ids)} never registered")
            await asyncio.sleep(0.2)

    async def inject(self, fault: str) -> None:
        assert self.nats is not None
        if fault == "nats_restart":
            port = self.nats.port
            self.nats.stop()
            await asyncio.sleep(self.s.nats_pause)
            self.nats.port = port
            self.nats.start()
        elif fault in ("worker_restart", "worker_kill"):
            proc = self.procs["w1"]
            proc.kill()
            proc.wait()
            if fault == "worker_restart":
                self.start_worker("w1")
            else:
                self.expected_dead.add("w1")
        elif fault == "worker_stop":
            proc = self.procs["w1"]
            proc.send_signal(signal.SIGSTOP)
            await asyncio.sleep(self.s.stop_for or 2 * self.s.ttl)
            proc.send_signal(signal.SIGCONT)

    async def heal(self, fault: str) -> None:
        """Back to the starting shape before the next trial."""
        if fault == "worker_kill":
            self.expected_dead.discard("w1")
            self.start_worker("w1")
        await self.wait_for_workers(set(self.workers))

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if self.nats is not None:
            self.nats.stop()


async def read_stream(http: aiohttp.ClientSession, url: str, prompt: str, s: Settings,
                      *, slow: bool, out: Outcome, clock: dict[str, float]) -> tuple[str, int]:
    """One streamed completion; fills ``out`` and returns (text, tokens)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": s.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "logprobs": 0}
    text, tokens = [], 0
    loop = asyncio.get_running_loop()
    async with http.post(url + "/completions", json=body) as resp:
        out.status = resp.status
        if resp.status != 200:
            out.error = (await resp.text())[:200]
            out.error_after_s = loop.time() - clock.get("fault", loop.time())
            return "", 0
        async for line in resp.content:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                out.error = f"{event['error'].get('code')}: {event['error'].get('message')}"
                out.error_after_s = loop.time() - clock.get("fault", loop.time())
                continue
            choice = event["choices"][0]
            text.append(choice["text"])
            tokens += len((choice.get("logprobs") or {}).get("tokens") or [])
            out.finish = choice.get("finish_reason") or out.finish
            if slow:
                await asyncio.sleep(s.slow_reader)
    return "".join(text), tokens


async def trial(dep: Deployment, fault: str, n: int, expected: dict[str, str],
                s: Settings) -> list[Outcome]:
    clock: dict[str, float] = {}
    outs = [Outcome(fault, n, i, slow=i % 2 == 1) for i in range(s.streams)]
    timeout = aiohttp.ClientTimeout(total=180)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        tasks = [asyncio.create_task(read_stream(http, dep.base_url, _prompt(i), s,
                                                 slow=outs[i].slow, out=outs[i], clock=clock))
                 for i in range(s.streams)]
        await asyncio.sleep(s.fault_after)
        clock["fault"] = asyncio.get_running_loop().time()
        await dep.inject(fault)
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for i, (out, res) in enumerate(zip(outs, results, strict=True)):
        if isinstance(res, BaseException):
            out.error = out.error or f"client: {res!r}"
            text, tokens = "", 0
        else:
            text, tokens = res
        out.tokens = tokens
        out.text_ok = text == expected[_prompt(i)]
        whole = (out.status == 200 and out.finish == "length" and tokens == s.max_tokens
                 and (out.text_ok or s.engine != "mock"))
        out.verdict = "error" if out.error else "intact" if whole else "wrong"
    await dep.heal(fault)
    return outs


async def settled(dep: Deployment, timeout: float = 15.0) -> None:
    """Until every worker reports itself idle: a trial started while the routers still
    see the last run's streams on a worker would send all its streams to the other
    one, and a fault injected into the idle worker would test nothing."""
    health = dep.base_url.removesuffix("/v1") + "/health"
    deadline = asyncio.get_running_loop().time() + timeout
    async with aiohttp.ClientSession() as http:
        while asyncio.get_running_loop().time() < deadline:
            async with http.get(health) as r:
                workers = (await r.json()).get("workers", [])
            if workers and all(w.get("active_requests") == 0 for w in workers):
                break
            await asyncio.sleep(0.1)
    await asyncio.sleep(0.3)  # the routers' view of the same reports


def _prompt(i: int) -> str:
    return f"Stream {i}: tell me a long story about the number {i * 7 + 3}."


async def undisturbed(dep: Deployment, s: Settings) -> dict[str, str]:
    clock: dict[str, float] = {}
    async with aiohttp.ClientSession() as http:
        outs = [Outcome("none", 0, i) for i in range(s.streams)]
        got = await asyncio.gather(*(read_stream(http, dep.base_url, _prompt(i), s, slow=False,
                                                 out=outs[i], clock=clock)
                                     for i in range(s.streams)))
    bad = [o for o in outs if o.error or o.status != 200]
    if bad:
        raise RuntimeError(f"the undisturbed run failed: {bad}")
    return {_prompt(i): text for i, (text, _) in enumerate(got)}


async def run_fault(fault: str, trials: int, s: Settings, model_dir: str,
                    workdir: Path) -> tuple[list[Outcome], dict[str, int]]:
    """``trials`` trials of one fault on a fresh deployment; the outcomes and the
    frontend's gap counters."""
    two = fault in ("worker_kill", "worker_stop")
    # One worker for restarts, with room for half the streams: the rest wait in its
    # queue, and must still be served by the new process.
    capacity = 64 if fault != "worker_restart" else max(1, s.streams // 2)
    dep = Deployment(workdir, model_dir, s, workers=("w1", "w2") if two else ("w1",),
                     capacity=capacity)
    try:
        await dep.start()
        expected = await undisturbed(dep, s)
        outcomes: list[Outcome] = []
        for n in range(trials):
            await settled(dep)
            outcomes += await trial(dep, fault, n, expected, s)
        async with aiohttp.ClientSession() as http, \
                http.get(dep.base_url.removesuffix("/v1") + "/health") as r:
            gaps = (await r.json()).get("streams", {})
    finally:
        dep.close()
    return outcomes, gaps


def _row(fault: str, outs: list[Outcome], trials: int, s: Settings, gaps: dict[str, int]
         ) -> dict[str, object]:
    # A slow reader meets the error only after the text it has not read yet: time to
    # error is taken over the streams read at full speed.
    times = sorted(o.error_after_s for o in outs if o.verdict == "error" and not o.slow
                   and o.error_after_s is not None)
    return {"fault": fault, "engine": s.engine, "trials": trials, "streams": len(outs),
            "intact": sum(o.verdict == "intact" for o in outs),
            "error": sum(o.verdict == "error" for o in outs),
            "wrong": sum(o.verdict == "wrong" for o in outs),
            "error_p50_s": round(statistics.median(times), 2) if times else None,
            "error_p99_s": (round(times[min(len(times) - 1, int(0.99 * len(times)))], 2)
                            if times else None),
            "gaps_repaired": gaps.get("gaps_repaired"), "gaps_failed": gaps.get("gaps_failed"),
            "errors": sorted({(o.error or "")[:90] for o in outs if o.error})}


def _markdown(rows: list[dict[str, object]], meta: dict[str, str], s: Settings) -> str:
    lines = ["| fault | engine | trials | streams | completed intact | ended with an error | "
             "silently wrong | time to error p50 / p99 s | gaps repaired / failed |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        times = "—" if r["error_p50_s"] is None else f"{r['error_p50_s']} / {r['error_p99_s']}"
        lines.append(f"| {r['fault']} | {r['engine']} | {r['trials']} | {r['streams']} | "
                     f"{r['intact']} | {r['error']} | {r['wrong']} | {times} | "
                     f"{r['gaps_repaired']} / {r['gaps_failed']} |")
    errors = [f"- {r['fault']}: " + "; ".join(r["errors"])  # type: ignore[arg-type]
              for r in rows if r["errors"]]
    r = REFERENCE
    return "\n".join([
        "# Faults: what a streaming client sees", "",
        f"Mock engine: {s.streams} streams per trial ({s.max_tokens} tokens, greedy, "
        f"`ignore_eos`, logprobs, every other one read slowly), the fault {s.fault_after} s "
        f"in; reference engine: {r.streams} streams of {r.max_tokens} tokens, the fault "
        f"{r.fault_after} s in. Heartbeat {s.heartbeat} s, TTL {s.ttl} s; every role its "
        "own process on 127.0.0.1. `bench/faults.py` says how each stream is judged and "
        "what each fault does. Time to error: from the fault to the error event, over the "
        "streams read at full speed (a slow reader meets it after the text it has not read "
        "yet).", "", *lines, "", "Errors the clients saw:", "", *errors, "",
        *(f"- {k}: {v}" for k, v in meta.items()), ""])


def _meta(argv: list[str]) -> dict[str, str]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT, check=False).stdout.strip()
    return {"command": "python bench/faults.py " + " ".join(argv),
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "commit": commit, "machine": f"{platform.node()}, {os.cpu_count()} CPUs, "
                                         f"Python {platform.python_version()}"}


# The reference engine decodes ~40 tokens/s per stream here: shorter answers, fewer
# streams, and only the fault that depends on the engine's pace (worker faults do not).
REFERENCE = Settings(engine="reference", streams=4, max_tokens=200, fault_after=3.0)


async def measure(runs: list[tuple[str, Settings, int]]) -> list[dict[str, object]]:
    model_dir = str(resolve_model(None).path)
    rows = []
    for fault, s, trials in runs:
        with tempfile.TemporaryDirectory(prefix=f"faults-{fault}-") as tmp:
            outs, gaps = await run_fault(fault, trials, s, model_dir, Path(tmp))
        rows.append(_row(fault, outs, trials, s, gaps))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--faults", default=",".join(FAULTS), help="comma-separated (mock engine)")
    ap.add_argument("--trials", type=int, default=10, help="trials per fault")
    ap.add_argument("--reference-faults", default="nats_restart",
                    help="faults also run on the reference engine (comma-separated; '' none)")
    ap.add_argument("--reference-trials", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "faults"),
                    help="writes OUT.md and OUT.json")
    a = ap.parse_args(argv)
    mock = Settings()
    runs = [(f, mock, a.trials) for f in a.faults.split(",") if f]
    runs += [(f, REFERENCE, a.reference_trials) for f in a.reference_faults.split(",") if f]
    rows = asyncio.run(measure(runs))
    meta = _meta(argv)
    Path(a.out + ".md").write_text(_markdown(rows, meta, mock))
    Path(a.out + ".json").write_text(json.dumps({"mock": asdict(mock),
                                                 "reference": asdict(REFERENCE), "rows": rows,
                                                 **meta}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
