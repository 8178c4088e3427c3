"""``dynamo-bus replay``: a Mooncake trace sent to a running deployment, and measured.

Each trace request becomes one streamed ``/v1/completions`` request: the prompt as a
token-id array (the trace's ``token_ids``, else tokens synthesized from its
``hash_ids``, so equal ids give equal blocks and the deployment sees the trace's
prefix reuse), ``max_tokens`` = ``output_length`` with ``ignore_eos`` (every answer has
the traced length) and ``stream_options.include_usage`` (the last chunk's
``prompt_tokens_details.cached_tokens`` is the prefix cache hit). It goes to the HTTP
frontend, or straight onto NATS through ``DynamoClient("nats://...")``, which runs the
frontend's service in this process.

Schedule: each request at its trace timestamp divided by ``speedup`` (open loop, as the
trace was recorded), or ``concurrency`` requests in flight in trace order (closed loop).
Each gives a :class:`~dynamo_bus.traces.report.RequestRecord`: TTFT from sending to the first
token, mean ITL, E2E, cached and output tokens, or the error of a request that failed
(a failed request never stops the replay). Ctrl-C stops sending, cancels what is in
flight (counted in the report, not as errors) and reports what was done.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dynamo_bus.errors import ConfigError, DynamoBusError, ModelUnavailable
from dynamo_bus.serving.client import DynamoClient
from dynamo_bus.traces.mooncake import TraceRequest, synth_tokens
from dynamo_bus.traces.report import RequestRecord

DEFAULT_VOCAB = 49152  # SmolLM2's


@dataclass
class ReplaySettings:
    target: str                      # http(s)://host:port/v1 or nats://host:port
    model: str | None = None         # HTTP: served name; NATS: model directory (or name)
    speedup: float = 1.0
    concurrency: int | None = None   # set: closed loop with this many in flight
    timeout: float = 600.0           # per request, seconds
    vocab_size: int | None = None    # None: the model directory's, else DEFAULT_VOCAB
    namespace: str = "dynamo"


def model_vocab(model: str | None) -> int | None:
    """The vocabulary size of ``model`` when its directory is at hand (a path, or a
    model built into the local cache under that name); nothing is fetched."""
    from dynamo_bus.models.modeldir import DEFAULT_MODEL, default_cache_dir, load_model_dir

    paths = [Path(model).expanduser()] if model else []
    paths.append(default_cache_dir() / "models" / (Path(model).name if model else DEFAULT_MODEL))
    for path in paths:
        if (path / "config.json").is_file():
            with contextlib.suppress(ModelUnavailable):
                return load_model_dir(path).vocab_size
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, DynamoBusError):
        return f"{exc.status} {exc.code}: {exc.message}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _served_model(client: DynamoClient, s: ReplaySettings) -> str:
    try:
        models = await client.models.list()
    except Exception as exc:
        raise ConfigError(f"cannot list the models at {s.target}: {_describe(exc)}") from exc
    http = s.target.startswith(("http://", "https://"))
    if http and s.model:
        if s.model not in models:
            raise ConfigError(f"--model {s.model!r} is not served at {s.target} "
                              f"(served: {', '.join(models) or 'nothing'})")
        return s.model
    if not models:
        raise ConfigError(f"no live worker serves a model at {s.target}"
                          + ("" if http else f" for --model {s.model or 'default'}"))
    return models[0]


async def _send(client: DynamoClient, model: str, tokens: list[int], req: TraceRequest,
                rec: RequestRecord, timeout: float) -> None:
    """One request, filling in ``rec``; never raises but for cancellation."""
    clock = time.perf_counter  # uvloop's loop.time() counts whole milliseconds
    sent = clock()
    first = last = 0.0
    chunks = 0
    try:
        async with asyncio.timeout(timeout):
            stream = await client.completions.create(
                model=model, prompt=tokens, max_tokens=req.output_length, ignore_eos=True,
                stream=True, stream_options={"include_usage": True})
            async for chunk in stream:
                now = clock()
                if chunk.usage is not None:
                    rec.output_tokens = chunk.usage.completion_tokens or 0
                    details = chunk.usage.prompt_tokens_details
                    rec.cached_tokens = (details.cached_tokens or 0) if details else 0
                if chunk.choices:
                    first = first or now
                    last = now
                    chunks += 1
    except TimeoutError:
        rec.error = f"timed out after {timeout:g} s"
    except asyncio.CancelledError:
        rec.error = "interrupted"
        raise
    except Exception as exc:
        rec.error = _describe(exc)
    if rec.error is None and not chunks:
        rec.error = "the stream ended without a token"
    if rec.error is None:
        rec.output_tokens = rec.output_tokens or chunks
        rec.ttft_ms = (first - sent) * 1000
        rec.e2e_ms = (last - sent) * 1000
        if rec.output_tokens > 1:
            rec.itl_ms = (last - first) * 1000 / (rec.output_tokens - 1)


def _check(s: ReplaySettings) -> DynamoClient:
    """The client for ``s.target``, once the settings are known to be usable."""
    if s.speedup <= 0:
        raise ConfigError(f"--speedup must be positive, got {s.speedup}")
    if s.concurrency is not None and s.concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1, got {s.concurrency}")
    over_nats = s.target.startswith(("nats://", "tls://"))
    try:
        return DynamoClient(s.target, model_dir=s.model if over_nats else None,
                            namespace=s.namespace, timeout=s.timeout + 5)
    except ValueError as exc:
        raise ConfigError(f"--url/--nats-url: {exc}") from exc


@dataclass
class _Sender:
    """Sends trace requests on one schedule or the other, recording each."""

    client: DynamoClient
    model: str
    vocab: int
    timeout: float
    bar: Any  # tqdm
    t0: float = field(default_factory=time.perf_counter)
    records: list[RequestRecord] = field(default_factory=list)

    async def one(self, i: int, req: TraceRequest, arrival: float) -> None:
        rec = RequestRecord(index=i, arrival_s=arrival, start_s=time.perf_counter() - self.t0,
                            prompt_tokens=req.input_length)
        self.records.append(rec)
        try:
            try:
                tokens = synth_tokens(req, self.vocab).tolist()
            except ConfigError as exc:  # too few hash ids for its length
                rec.error = f"trace request {i}: {exc.message}"
            else:
                rec.prompt_tokens = len(tokens)
                await _send(self.client, self.model, tokens, req, rec, self.timeout)
        finally:
            self.bar.update()
            if rec.error is not None:
                self.bar.set_postfix(errors=sum(r.error is not None for r in self.records))

    async def open_loop(self, trace: list[TraceRequest], speedup: float) -> None:
        tasks = []
        start = trace[0].timestamp if trace else 0.0
        try:
            for i, req in enumerate(trace):
                due = (req.timestamp - start) / 1000 / speedup
                delay = self.t0 + due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(self.one(i, req, due)))
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:  # stopped while sending: cancel what is out
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def closed_loop(self, trace: list[TraceRequest], n: int) -> None:
        todo = iter(enumerate(trace))

        async def lane() -> None:
            for i, req in todo:  # shared: each lane takes the next request
                await self.one(i, req, time.perf_counter() - self.t0)

        await asyncio.gather(*(lane() for _ in range(n)))


async def _until_done_or_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> None:
    """Run ``work``; cancel it when ``stop`` is set first."""
    task = asyncio.create_task(work)
    halt = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([task, halt], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, halt):
            t.cancel()
        await asyncio.gather(task, halt, return_exceptions=True)


async def replay(trace: list[TraceRequest], s: ReplaySettings, *,
                 stop: asyncio.Event | None = None,
                 progress: bool = True) -> tuple[list[RequestRecord], dict[str, Any]]:
    """Replay ``trace`` against ``s.target``; returns one record per request sent (in
    trace order) and what the report should say about the run."""
    client = _check(s)
    stop = stop or asyncio.Event()
    async with client:
        model = await _served_model(client, s)
        vocab = s.vocab_size or model_vocab(s.model or model) or DEFAULT_VOCAB
        bar = tqdm(total=len(trace), unit="req", file=sys.stderr, disable=not progress,
                   dynamic_ncols=True, desc="replay")
        sender = _Sender(client, model, vocab, s.timeout, bar)
        work = (sender.closed_loop(trace, s.concurrency) if s.concurrency
                else sender.open_loop(trace, s.speedup))
        try:
            await _until_done_or_stopped(work, stop)
        finally:
            bar.close()
        wall = time.perf_counter() - sender.t0
    # What Ctrl-C cut off did not fail: it is counted, not reported as an error.
    cut = [r for r in sender.records if r.error == "interrupted"]
    records = sorted((r for r in sender.records if r.error != "interrupted"),
                     key=lambda r: r.index)
    meta = {"target": s.target, "model": model, "requests in trace": len(trace),
            "sent": len(records) + len(cut), "interrupted": stop.is_set(),
            "cancelled in flight": len(cut),
            "schedule": (f"{s.concurrency} in flight" if s.concurrency
                         else f"trace timestamps / {s.speedup:g}"),
            "timeout_s": s.timeout, "vocab_size": vocab, "wall_s": round(wall, 3)}
    return records, meta
