"""Shared fixtures: a real nats-server on port 0 with a temp store, the real SmolLM2
model directory, and a whole in-process stack (workers, router, frontend)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dynamo_bus.bus.natsserver import EmbeddedNats
from dynamo_bus.config import Config
from dynamo_bus.models.modeldir import ModelDir, resolve_model
from dynamo_bus.roles import Roles

# Fast liveness so tests that kill things finish quickly.
FAST = dict(heartbeat_interval=0.2, worker_ttl=1.5, router_ack_wait=1.0, drain_timeout=10.0)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Fetch the model once before any test starts (a first run downloads ~98 MB), so
    the download never counts against one test's timeout."""
    resolve_model(None, progress=True)


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
