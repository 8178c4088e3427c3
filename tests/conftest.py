"""Shared fixtures: a real nats-server on port 0 with a temp store, the real SmolLM2
model directory, and a whole in-process stack (workers, router, frontend)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dynamo_bus.bus.natsserver import EmbeddedNats
from dynamo_bus.config import Config
from dynamo_bus.models.modeldir import (
    CACHE_ENV,
    DEFAULT_MODEL,
    ModelDir,
    default_cache_dir,
    resolve_model,
)
from dynamo_bus.roles import Roles

# Fast liveness so tests that kill things finish quickly.
FAST = dict(heartbeat_interval=0.2, worker_ttl=1.5, router_ack_wait=1.0, drain_timeout=10.0)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Fetch the model once before any test starts (a first run downloads ~98 MB), so
    the download never counts against one test's timeout, and say where the model cache
    is and how big it is."""
    cache = default_cache_dir()
    first_use = not (cache / "models" / DEFAULT_MODEL).is_dir()
    started = time.monotonic()
    capture = session.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        resolve_model(None, progress=True)  # pip's progress bar reaches the terminal
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    built = f", fetched and built now in {time.monotonic() - started:.0f} s" if first_use else ""
    reporter = session.config.pluginmanager.getplugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"dynamo-bus model cache: {cache} ({size / 1e6:.0f} MB{built}; "
                            f"set {CACHE_ENV} to put it elsewhere)")


@pytest.fixture(scope="session")
def model_dir() -> ModelDir:
    return resolve_model(None, progress=False)


@pytest.fixture(scope="session")
def fp32_dir(model_dir: ModelDir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the model directory with float32 weights (the GGUF dequantized exactly),
    for comparisons with transformers; tests never write into the user's cache."""
    import dataclasses
    import shutil

    from dynamo_bus.models.weights import ensure_weights

    dest = tmp_path_factory.mktemp("fp32") / "model"
    shutil.copytree(model_dir.path, dest, ignore=shutil.ignore_patterns("model.safetensors*"))
    ensure_weights(dataclasses.replace(model_dir, path=dest), "float32", progress=False)
    return dest


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path / "js", log_file=tmp_path / "nats.log")
    server.start()
    yield server
    server.stop()



@pytest.fixture
def ucx_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """NIXL installed, and UCX kept to loopback shared memory (its default listens on
    other interfaces): for tests whose agents talk to each other, and the processes
    they start."""
    pytest.importorskip("nixl_cu12")
    monkeypatch.setenv("UCX_TLS", "self,sm")
    monkeypatch.setenv("UCX_NET_DEVICES", "lo")

def make_config(nats_url: str, model_dir: ModelDir, **overrides: Any) -> Config:
    settings: dict[str, Any] = dict(nats_url=nats_url, model=str(model_dir.path),
                                    engine="mock", mock_speedup=1000.0, http_port=0, **FAST)
    settings.update(overrides)
    return Config(**settings)


@dataclass
class Stack:
    roles: Roles
    cfg: Config
    nats_url: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.roles.http_port}/v1"


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def stack(nats_server: EmbeddedNats, model_dir: ModelDir) -> AsyncIterator[StackFactory]:
    """``await stack(workers=2, router=True, frontend=True, **config)``."""
    made: list[Roles] = []

    async def make(workers: int = 2, router: bool = True, frontend: bool = True,
                   **overrides: Any) -> Stack:
        cfg = make_config(nats_server.url, model_dir, **overrides)
        roles = Roles(cfg)
        made.append(roles)
        if workers:
            await roles.add_workers(workers)
        if router:
            await roles.add_router()
        if frontend:
            await roles.add_frontend()
        return Stack(roles, cfg, nats_server.url)

    yield make
    for roles in reversed(made):
        await roles.stop()


def cli_env() -> dict[str, str]:
    """Environment for `dynamo-bus` subprocesses started by tests."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class Processes:
    """The `dynamo-bus` processes one test starts. Teardown kills and reaps every one still
    running (and closes its pipe), so a failing test never leaves a process behind to
    break the tests after it."""

    def __init__(self) -> None:
        self._started: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, log: Path | None = None,
              **popen: Any) -> subprocess.Popen[bytes]:
        """``dynamo-bus ARGS...`` with its output in ``log`` (else as ``popen`` says)."""
        cmd = [sys.executable, "-m", "dynamo_bus.cli", *args]
        if log is None:
            proc = subprocess.Popen(cmd, env=cli_env(), **popen)
        else:
            with open(log, "wb") as out:  # the child keeps its own descriptor
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                        env=cli_env(), **popen)
        self._started.append(proc)
        return proc

    def close(self) -> None:
        for proc in self._started:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.fixture
def procs() -> Iterator[Processes]:
    started = Processes()
    try:
        yield started
    finally:
        started.close()
