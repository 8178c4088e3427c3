"""How a command runs its top-level coroutine: the event loop every ``dynamo-bus``
command (serving roles, ``record``, ``replay``) runs on."""

from __future__ import annotations

import asyncio
import typing

T = typing.TypeVar("T")


def run_loop(main: typing.Coroutine[typing.Any, typing.Any, T]) -> T:
    """Run on uvloop where it is installed (Linux, macOS): the bus is I/O bound and
    uvloop's event loop spends far less time per message than asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    else:
        return uvloop.run(main)
