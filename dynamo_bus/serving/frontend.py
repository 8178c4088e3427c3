"""The OpenAI-compatible HTTP frontend (aiohttp).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streaming as SSE
ending in ``data: [DONE]``, or unary), ``GET /v1/models``, ``/health`` (lists live
workers), ``/live`` and ``/ready``. Every error is OpenAI-shaped. A client that
disconnects cancels its handler (``handler_cancellation``), which cancels the request
on the bus, so the worker stops generating.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from dynamo_bus.bus.registry import Registry
from dynamo_bus.errors import DynamoBusError, InvalidRequest
from dynamo_bus.serving.openai_api import Kind, model_list_body, parse_request
from dynamo_bus.serving.service import CompletionService

log = logging.getLogger(__name__)

SERVICE = web.AppKey("service", CompletionService)
REGISTRY = web.AppKey("registry", Registry)

_json = msgspec.json.Encoder()
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                "Connection": "keep-alive"}


def _error_response(exc: DynamoBusError) -> web.Response:
    return web.Response(body=_json.encode(exc.to_openai()), status=exc.status,
                        content_type="application/json")


@web.middleware
async def _errors(request: web.Request,
                  handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                  ) -> web.StreamResponse:
    try:
        return await handler(request)
    except DynamoBusError as exc:
        return _error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        err = DynamoBusError(exc.reason, status=exc.status,
                             code="not_found" if exc.status == 404 else "http_error")
        err.type = "invalid_request_error"
        return _error_response(err)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error_response(DynamoBusError("internal server error"))


_json_decode = msgspec.json.Decoder()
_WRITE_AT = 16 * 1024  # bytes of ready events written at once, at most


async def _body(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return _json_decode.decode(raw)
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from exc


async def _generate(request: web.Request, kind: Kind) -> web.StreamResponse:
    service = request.app[SERVICE]
    parsed = parse_request(await _body(request), kind)
    stream = await service.submit(parsed)
    if not parsed.stream:
        try:
            return web.json_response(await service.complete(parsed, stream),
                                     dumps=lambda o: _json.encode(o).decode())
        finally:
            await stream.cancel()
    chunks = service.stream_chunks(parsed, stream)
    try:
        # Wait for the first chunk before sending headers: an error that comes
        # before any token (no worker, bad routing) keeps its HTTP status.
        first = await chunks.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        await chunks.aclose()
        raise
    resp = web.StreamResponse(headers=_SSE_HEADERS)
    await resp.prepare(request)
    # One event per chunk, but one socket write for the events that are ready
    # together: they are written when the stream is about to wait for the next chunk.
    out = bytearray()

    async def flush() -> None:
        if out:
            data = bytes(out)
            out.clear()
            await resp.write(data)

    stream.before_wait = flush
    try:
        if first is not None:
            await resp.write(b"data: " + _json.encode(first) + b"\n\n")
            async for chunk in chunks:
                out += b"data: " + _json.encode(chunk) + b"\n\n"
                if len(out) >= _WRITE_AT:
                    await flush()
    except DynamoBusError as exc:  # after headers: an error event, then [DONE]
        out += b"data: " + _json.encode(exc.to_openai()) + b"\n\n"
    finally:
        stream.before_wait = None
        await chunks.aclose()
    await resp.write(bytes(out) + b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


async def models(request: web.Request) -> web.Response:
    return web.json_response(model_list_body([request.app[SERVICE].model]))


async def health(request: web.Request) -> web.Response:
    registry, service = request.app[REGISTRY], request.app[SERVICE]
    workers = []
    for reg in registry.workers(include_draining=True):
        load = registry.load(reg.worker_id)
        workers.append({"worker_id": reg.worker_id, "model": reg.model, "engine": reg.engine,
                        "role": reg.role, "draining": reg.draining, "capacity": reg.capacity,
                        "active_requests": load.active_requests if load else None,
                        # KV blocks held and capacity per tier (device, host, disk),
                        # and what moved through the tiers below the pool.
                        "kv_tiers": {t: {"blocks": n, "capacity": load.tier_capacity.get(t),
                                         **load.tier_moves.get(t, {})}
                                     for t, n in load.tier_blocks.items()} if load else None,
                        # Disaggregated roles: KV lent and read over NIXL, descriptors
                        # published and claimed, claims prefilled here and why.
                        "kv_transfers": {**load.tier_moves.get("nixl", {}), **load.disagg}
                        if load else None})
    connected = service.requester.bus.nc.is_connected
    serving = any(w["model"] == service.model and not w["draining"] and w["role"] != "prefill"
                  for w in workers)
    status = "healthy" if connected and serving else "unhealthy"
    requester = service.requester
    body = {"status": status, "nats_connected": connected, "model": service.model,
            "workers": workers, "inflight": requester.inflight,
            # Token streams that lost chunks in transit: sent again, or ended with a 503.
            "streams": {"gaps_repaired": requester.gaps_repaired,
                        "gaps_failed": requester.gaps_failed}}
    return web.json_response(body, status=200 if status == "healthy" else 503)


async def live(request: web.Request) -> web.Response:
    return web.json_response({"status": "live"})


async def ready(request: web.Request) -> web.Response:
    registry, service = request.app[REGISTRY], request.app[SERVICE]
    ok = service.requester.bus.nc.is_connected and bool(registry.workers(service.model))
    return web.json_response({"status": "ready" if ok else "not ready"},
                             status=200 if ok else 503)


def make_app(service: CompletionService, registry: Registry) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=64 * 1024 * 1024)
    app[SERVICE] = service
    app[REGISTRY] = registry
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/live", live)
    app.router.add_get("/ready", ready)
    return app


async def start_http(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve ``app``; returns the runner and the bound port (``port=0`` picks one)."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None)
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, bound
