"""NIXL, through which KV blocks leave an engine's memory: to block files (the disk
tier, POSIX backend) and, for disaggregation, to other workers (UCX).

NIXL ships one Python build per CUDA major (``nixl_cu12``, ``nixl_cu13``); the ``nixl``
meta package picks the installed one. The project installs ``nixl-cu12`` alone (it runs
on CPU too), so :func:`load` takes whichever is there.

Agents here never start NIXL's progress or listen threads: the first spins a core when
idle, the second listens on every interface. Metadata an agent gives out grants access
to its registered memory: it is never logged.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from typing import Any


class NixlError(RuntimeError):
    """A NIXL transfer failed, or NIXL is not installed."""


def load() -> Any:
    """The NIXL Python API module (``nixl_agent``, ``nixl_agent_config`` ...)."""
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")  # its default logs every agent at info
    for name in ("nixl._api", "nixl_cu12._api", "nixl_cu13._api"):
        try:
            api = importlib.import_module(name)
        except ImportError:
            continue
        # Its Python side prints every agent and backend to stdout at info.
        logging.getLogger("nixl").setLevel(logging.WARNING)
        return api
    raise NixlError("NIXL is not installed (pip install nixl-cu12); the disk tier and "
                    "KV transfers between workers need it")


def make_agent(name: str, backends: dict[str, dict[str, str]]) -> Any:
    """An agent with no progress or listen thread and the ``backends`` (name: params)."""
    api = load()
    agent = api.nixl_agent(name, api.nixl_agent_config(
        enable_prog_thread=False, enable_listen_thread=False, backends=[]))
    for backend, params in backends.items():
        agent.create_backend(backend, params)
    return agent


def ucx_agent(name: str) -> Any:
    """An agent with NIXL's UCX backend: how another worker reads memory registered
    with it. Which transports and devices UCX uses is the operator's to say
    (``UCX_TLS``, ``UCX_NET_DEVICES``); the tests keep it to loopback shared memory."""
    return make_agent(name, {"UCX": {"ucx_error_handling_mode": "none"}})


def run_transfer(agent: Any, op: str, local: Any, remote: Any, peer: str,
                 notify: bytes = b"") -> None:
    """Post one transfer (``"READ"`` or ``"WRITE"`` of ``remote`` from/to ``local``) and
    wait for it, in the calling thread; raises :class:`NixlError` when it fails.
    ``notify``: a message the peer's agent gets once the transfer is done."""
    wait_transfer(agent, post_transfer(agent, op, local, remote, peer, notify))


def post_transfer(agent: Any, op: str, local: Any, remote: Any, peer: str,
                  notify: bytes = b"") -> Any:
    """Start a transfer; its handle is for :func:`wait_transfer`."""
    try:
        handle = agent.initialize_xfer(op, local, remote, peer, notify)
    except Exception as exc:  # the bindings raise their own types
        raise NixlError(f"NIXL {op} failed: {exc!r}") from exc
    try:
        if agent.transfer(handle) == "ERR":
            raise NixlError(f"NIXL {op} failed")
    except BaseException as exc:
        agent.release_xfer_handle(handle)
        if isinstance(exc, NixlError):
            raise
        raise NixlError(f"NIXL {op} failed: {exc!r}") from exc
    return handle


def wait_transfer(agent: Any, handle: Any) -> None:
    """Wait for a posted transfer to end, then release it; raises :class:`NixlError`
    when it failed."""
    try:
        spins = 0
        while (state := agent.check_xfer_state(handle)) not in ("DONE", "ERR"):
            spins += 1
            if spins > 32:  # I/O takes a while: give the core back between checks
                time.sleep(50e-6)
        if state == "ERR":
            raise NixlError("NIXL transfer failed")
    except NixlError:
        raise
    except Exception as exc:
        raise NixlError(f"NIXL transfer failed: {exc!r}") from exc
    finally:
        agent.release_xfer_handle(handle)
