"""Running roles in a process: ``serve`` (everything, one process, embedded NATS) or one
role per process (``frontend``, ``router``, ``worker``) against ``--nats-url``.

Start order: workers → router → frontend, so the frontend is ready only when it can
serve. Stop order is the reverse of what users see first: the frontend stops taking
requests and finishes those in flight, then workers drain, then the router stops,
then connections close and the embedded nats-server stops. A second signal exits at
once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec

from dynamo_bus.bus.connection import Bus, open_bus
from dynamo_bus.bus.natsserver import EmbeddedNats, die_with_parent
from dynamo_bus.bus.registry import Registry
from dynamo_bus.bus.subjects import validate_worker_id
from dynamo_bus.config import Config, env_name, to_env
from dynamo_bus.engines import make_engine
from dynamo_bus.errors import ConfigError
from dynamo_bus.models.modeldir import ModelDir, default_cache_dir, resolve_model, tokenizer_digest
from dynamo_bus.models.tokenizer import Tokenizer
from dynamo_bus.routing.router import Router
from dynamo_bus.serving.frontend import make_app, start_http
from dynamo_bus.serving.requester import Requester
from dynamo_bus.serving.service import CompletionService
from dynamo_bus.worker.outbox import Outbox
from dynamo_bus.worker.runtime import Worker

log = logging.getLogger(__name__)

Stop = Callable[[], Awaitable[None]]


class Roles:
    """What one process runs, with an ordered, idempotent ``stop``."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.nats: EmbeddedNats | None = None
        self.url = cfg.nats_url or ""
        self.http_port = 0
        self.workers: list[Worker] = []
        self.routers: list[Router] = []
        self._buses: list[Bus] = []
        self._stops: list[tuple[int, Stop]] = []  # (order, stop): lower stops first
        self._model: ModelDir | None = None
        self.failed = asyncio.Event()  # a child process this one depends on died
        self._children: list[asyncio.Task[None]] = []

    # -- pieces ------------------------------------------------------------------
    def start_embedded_nats(self, store_dir: Path | None = None) -> str:
        store = store_dir or Path(self.cfg.store_dir or default_cache_dir() / "nats")
        self.nats = EmbeddedNats(store, log_file=store.parent / "nats-server.log")
        self.url = self.nats.start()
        return self.url

    def model(self) -> ModelDir:
        if self._model is None:
            self._model = resolve_model(self.cfg.model)
            if self.cfg.context_length:
                self._model = dataclasses.replace(self._model,
                                                  context_length=self.cfg.context_length)
        return self._model

    @property
    def model_name(self) -> str:
        return self.cfg.served_model_name or self.model().name

    async def _bus(self, name: str) -> Bus:
        bus = await open_bus(self.cfg, self.url, name=name)
        self._buses.append(bus)
        return bus

    async def add_workers(self, count: int, role: str | None = None) -> list[Worker]:
        """Start ``count`` workers of ``role`` (default ``--role``)."""
        cfg = self.cfg
        if role is not None:  # serve --disagg: one process, a worker of each role
            wid = f"{cfg.worker_id}-{role}" if cfg.worker_id else None
            cfg = msgspec.structs.replace(cfg, role=role, worker_id=wid)
        model = self.model()
        new = []
        # The workers of one process share a connection: publishes from all of them go
        # out in the same socket writes, their token chunks in the same batches.
        bus = await self._bus("workers") if count else None
        outbox = Outbox(bus.nc) if bus is not None else None
        tokenizer = tokenizer_digest(model)
        for i in range(count):
            kind = cfg.engine if cfg.role == "aggregated" else f"{cfg.engine}-{cfg.role}"
            base = cfg.worker_id or f"{kind}-{uuid.uuid4().hex[:8]}"
            wid = validate_worker_id(base if count == 1 else f"{base}-{i}")
            engine = make_engine(cfg, model, self.model_name)
            await engine.start()
            assert bus is not None
            worker = Worker(bus, engine, cfg, worker_id=wid, model=self.model_name,
                            tokenizer=tokenizer, outbox=outbox)
            await worker.start()

            async def _stop(worker: Worker = worker) -> None:
                await worker.drain()
                await worker.engine.stop()

            self._stops.append((1, _stop))
            new.append(worker)
        self.workers += new
        return new

    async def add_router(self) -> Router:
        router = Router(await self._bus("router"), self.cfg)
        await router.start()
        self._stops.append((2, router.stop))
        self.routers.append(router)
        return router

    async def add_frontend(self, *, port: int | None = None) -> int:
        model = self.model()
        bus = await self._bus("frontend")
        registry = Registry(bus, ttl=self.cfg.worker_ttl)
        await registry.start()
        requester = Requester(bus, registry, max_inflight=self.cfg.max_inflight,
                              timeout=self.cfg.request_timeout,
                              fold_chunks=self.cfg.fold_chunks)
        await requester.start()
        tokenizer = await asyncio.to_thread(Tokenizer.from_dir, model.path)
        service = CompletionService(requester, model, tokenizer, served_name=self.model_name)
        runner, self.http_port = await start_http(
            make_app(service, registry), self.cfg.http_host,
            self.cfg.http_port if port is None else port)
        log.info("frontend serving %s at http://%s:%d/v1", self.model_name,
                 self.cfg.http_host, self.http_port)

        async def _stop() -> None:
            await runner.cleanup()
            await requester.stop()
            await registry.stop()

        self._stops.append((0, _stop))
        return self.http_port

    async def spawn_frontend(self) -> int:
        """Run the frontend in a child process against this process's NATS (``serve``
        with ``frontend_process``): the GIL gives one Python process one core, and the
        frontend (HTTP, tokenizing, detokenizing) is half the work of a request."""
        port = self.cfg.http_port or _free_port(self.cfg.http_host)
        env = {**os.environ, **to_env(self.cfg), env_name("nats_url"): self.url,
               env_name("http_port"): str(port), env_name("model"): str(self.model().path)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dynamo_bus.cli", "frontend", env=env,
            preexec_fn=die_with_parent)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while True:
            if proc.returncode is not None:
                raise ConfigError(f"the frontend process exited with {proc.returncode}")
            try:
                _, writer = await asyncio.open_connection(self.cfg.http_host, port)
            except OSError:
                if loop.time() > deadline:
                    proc.kill()
                    raise ConfigError("the frontend process did not start listening") from None
                await asyncio.sleep(0.1)
                continue
            writer.close()
            break

        async def _watch() -> None:
            code = await proc.wait()
            log.error("the frontend process exited with %s", code)
            self.failed.set()

        watcher = asyncio.create_task(_watch())
        self._children.append(watcher)

        async def _stop() -> None:
            watcher.cancel()
            if proc.returncode is None:
                proc.terminate()
                try:
                    async with asyncio.timeout(self.cfg.drain_timeout + 5):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()

        self._stops.append((0, _stop))
        self.http_port = port
        return port

    async def stop(self) -> None:
        stops, self._stops = self._stops, []
        for order in sorted({o for o, _ in stops}):  # one stage at a time, its roles together
            stage = [asyncio.ensure_future(stop()) for o, stop in stops if o == order]
            # Bounded: a stop that hangs must not keep the process from exiting.
            done, hung = await asyncio.wait(stage, timeout=self.cfg.drain_timeout + 15)
            for task in hung:
                log.error("a role did not stop in time; abandoning it")
                task.cancel()
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.error("error while stopping: %r", task.exception())
        for bus in self._buses:
            with contextlib.suppress(Exception):
                await bus.close()
        self._buses = []
        if self.nats is not None:
            self.nats.stop()
            self.nats = None


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def install_signal_handlers() -> asyncio.Event:
    """The returned event is set by the first SIGINT/SIGTERM; a second signal exits the
    process at once. Installed before anything starts, so a signal during start-up
    still shuts down in order."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def _on_signal() -> None:
        if stop.is_set():
            log.warning("second signal: exiting now")
            os._exit(1)
        log.info("shutting down (signal again to force)")
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _on_signal)
    return stop


async def wait_any(*events: asyncio.Event) -> None:
    waits = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()


async def run(cfg: Config, role: str) -> None:
    """Run ``role`` (serve, frontend, router, worker) until a signal."""
    stop = install_signal_handlers()
    roles = Roles(cfg)
    try:
        if role == "serve" and not cfg.nats_url:
            roles.start_embedded_nats()
            log.info("embedded nats-server at %s", roles.url)
            if cfg.disagg:  # every worker on this host: NIXL (UCX) stays on loopback
                os.environ.setdefault("UCX_NET_DEVICES", "lo")
        if role in ("serve", "frontend", "worker"):
            await asyncio.to_thread(roles.model)
        if role == "serve" and cfg.disagg:
            await roles.add_workers(1, "prefill")
            await roles.add_workers(1, "decode")
        elif role in ("serve", "worker"):
            await roles.add_workers(cfg.workers)
        if role in ("serve", "router"):
            await roles.add_router()
        if role == "serve" and cfg.frontend_process:
            await roles.spawn_frontend()
        elif role in ("serve", "frontend"):
            await roles.add_frontend()
        await wait_any(stop, roles.failed)
    finally:
        await roles.stop()
    if roles.failed.is_set():
        raise ConfigError("a child process failed; see the log above")
