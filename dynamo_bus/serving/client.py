"""``DynamoClient``: the OpenAI client's shape, over HTTP or straight over NATS.

    async with DynamoClient("http://127.0.0.1:8000/v1") as client:   # via a frontend
    async with DynamoClient("nats://127.0.0.1:4222") as client:      # no frontend
        stream = await client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=[...], stream=True)
        async for chunk in stream:
            print(chunk.choices[0].delta.content or "", end="")

Both transports return the same objects (attribute access over the OpenAI JSON; a
``to_dict()`` gives the JSON back) and raise the same ``DynamoBusError`` subclasses
with the HTTP status an OpenAI server would answer with. Over NATS the client
tokenizes itself, so it needs the model directory (``model_dir=``, default SmolLM2).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import aiohttp

from dynamo_bus.errors import DynamoBusError, from_status


class Obj:
    """Read-only attribute view of a JSON object (what the OpenAI SDK's models give)."""

    __slots__ = ("_d",)

    def __init__(self, d: dict[str, Any]) -> None:
        self._d = d

    def __getattr__(self, name: str) -> Any:
        try:
            return _wrap(self._d[name])
        except KeyError:
            if name.startswith("_"):
                raise AttributeError(name) from None
            return None  # OpenAI models give None for absent optional fields

    def __getitem__(self, key: str) -> Any:
        return _wrap(self._d[key])

    def to_dict(self) -> dict[str, Any]:
        return self._d

    def __repr__(self) -> str:
        return f"Obj({self._d!r})"


def _wrap(v: Any) -> Any:
    if isinstance(v, dict):
        return Obj(v)
    if isinstance(v, list):
        return [_wrap(x) for x in v]
    return v


class _Transport(Protocol):
    async def create(self, kind: str, body: dict[str, Any]) -> Any: ...
    async def list_models(self) -> list[str]: ...
    async def close(self) -> None: ...


class _Http:
    def __init__(self, base_url: str, api_key: str | None, timeout: float) -> None:
        self.base = base_url.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.session = aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=timeout),
            connector=aiohttp.TCPConnector(limit=0))

    async def _raise(self, resp: aiohttp.ClientResponse) -> None:
        try:
            err = (await resp.json(content_type=None))["error"]
            raise from_status(resp.status, err.get("message", ""), code=err.get("code"),
                              param=err.get("param"))
        except (ValueError, KeyError, TypeError, aiohttp.ContentTypeError):
            raise from_status(resp.status, await resp.text()) from None

    async def create(self, kind: str, body: dict[str, Any]) -> Any:
        path = "/chat/completions" if kind == "chat" else "/completions"
        resp = await self.session.post(self.base + path, json=body)
        if resp.status >= 400:
            try:
                await self._raise(resp)
            finally:
                resp.release()
        if not body.get("stream"):
            async with resp:
                return Obj(await resp.json())
        return self._events(resp)

    async def _events(self, resp: aiohttp.ClientResponse) -> AsyncIterator[Obj]:
        async with resp:
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    e = event["error"]
                    raise from_status(None, e.get("message", ""), code=e.get("code"),
                                      param=e.get("param"))
                yield Obj(event)

    async def list_models(self) -> list[str]:
        async with self.session.get(self.base + "/models") as resp:
            if resp.status >= 400:
                await self._raise(resp)
            return [m["id"] for m in (await resp.json())["data"]]

    async def close(self) -> None:
        await self.session.close()


class _Nats:
    """Runs the frontend's service in-process on a NATS connection."""

    def __init__(self, url: str, model_dir: str | None, namespace: str, timeout: float):
        self.url, self.model_dir, self.namespace, self.timeout = url, model_dir, namespace, timeout
        self.service: Any = None

    async def start(self) -> None:
        import asyncio

        from dynamo_bus.bus.connection import open_bus
        from dynamo_bus.bus.registry import Registry
        from dynamo_bus.config import Config
        from dynamo_bus.models.modeldir import resolve_model
        from dynamo_bus.models.tokenizer import Tokenizer
        from dynamo_bus.serving.requester import Requester
        from dynamo_bus.serving.service import CompletionService

        cfg = Config(nats_url=self.url, namespace=self.namespace, model=self.model_dir)
        model = await asyncio.to_thread(resolve_model, self.model_dir)
        tokenizer = await asyncio.to_thread(Tokenizer.from_dir, model.path)
        self.bus = await open_bus(cfg, self.url, name="dynamo-client", ensure=False)
        try:
            self.registry = Registry(self.bus, ttl=cfg.worker_ttl)
            await self.registry.start()
            requester = Requester(self.bus, self.registry, timeout=self.timeout)
            await requester.start()
        except BaseException:
            await self.bus.close()
            raise
        self.service = CompletionService(requester, model, tokenizer)

    async def create(self, kind: str, body: dict[str, Any]) -> Any:
        from dynamo_bus.serving.openai_api import parse_request

        parsed = parse_request(body, "chat" if kind == "chat" else "completion")
        stream = await self.service.submit(parsed)
        if not parsed.stream:
            return Obj(await self.service.complete(parsed, stream))
        chunks = self.service.stream_chunks(parsed, stream)
        first = await anext(chunks, None)  # errors before any token raise here, as over HTTP
        return self._events(first, chunks)

    async def _events(self, first: Any, chunks: AsyncIterator[dict[str, Any]]
                      ) -> AsyncIterator[Obj]:
        try:
            if first is None:
                return
            yield Obj(first)
            async for chunk in chunks:
                yield Obj(chunk)
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    async def list_models(self) -> list[str]:
        return [self.service.model] if self.service.model in self.registry.models() else []

    async def close(self) -> None:
        if self.service is not None:
            await self.service.requester.stop()
            await self.registry.stop()
            await self.bus.close()


class _Completions:
    def __init__(self, client: DynamoClient, kind: str) -> None:
        self._client, self._kind = client, kind

    async def create(self, **body: Any) -> Any:
        """Same keyword arguments as the OpenAI client, plus dynamo-bus extensions
        (``priority``, ``routing_strategy``, ``worker_id``, ``top_k``, ``ignore_eos``).
        With ``stream=True`` returns an async iterator of chunks."""
        extra = body.pop("extra_body", None) or {}
        return await self._client._transport().create(self._kind, {**body, **extra})


class _Chat:
    def __init__(self, client: DynamoClient) -> None:
        self.completions = _Completions(client, "chat")


class _Models:
    def __init__(self, client: DynamoClient) -> None:
        self._client = client

    async def list(self) -> list[str]:
        return await self._client._transport().list_models()


class DynamoClient:
    def __init__(self, url: str, *, model_dir: str | None = None, namespace: str = "dynamo",
                 api_key: str | None = None, timeout: float = 600.0) -> None:
        self.url = url
        self._make: Callable[[], _Transport]
        if url.startswith(("http://", "https://")):
            self._make = lambda: _Http(url, api_key, timeout)
        elif url.startswith(("nats://", "tls://")):
            self._make = lambda: _Nats(url, model_dir, namespace, timeout)
        else:
            raise ValueError(f"url must start with http://, https:// or nats://, got {url!r}")
        self._t: _Transport | None = None
        self.chat = _Chat(self)
        self.completions = _Completions(self, "completion")
        self.models = _Models(self)

    def _transport(self) -> _Transport:
        if self._t is None:
            raise DynamoBusError("use `async with DynamoClient(...)` (or await open())")
        return self._t

    async def open(self) -> DynamoClient:
        if self._t is None:
            t = self._make()
            if isinstance(t, _Nats):
                await t.start()
            self._t = t
        return self

    async def close(self) -> None:
        if self._t is not None:
            t, self._t = self._t, None
            await t.close()

    async def __aenter__(self) -> DynamoClient:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
