"""Engine registry. Backends are imported only when chosen, so heavy optional
dependencies (torch, vllm, sglang) are never imported by roles that do not run them."""

from __future__ import annotations

from collections.abc import Callable

from dynamo_bus.config import Config
from dynamo_bus.engines.base import Engine
from dynamo_bus.errors import ConfigError
from dynamo_bus.modeldir import ModelDir


def _mock(cfg: Config, model: ModelDir, name: str) -> Engine:
    from dynamo_bus.engines.mock import MockEngine

    return MockEngine(name, vocab_size=model.vocab_size, eos_token_ids=model.eos_token_ids,
                      context_length=model.context_length, block_size=cfg.block_size,
                      num_blocks=cfg.num_blocks, max_num_seqs=cfg.max_concurrency,
                      speedup=cfg.mock_speedup)


ENGINES: dict[str, Callable[[Config, ModelDir, str], Engine]] = {"mock": _mock}


def make_engine(cfg: Config, model: ModelDir, name: str) -> Engine:
    """Build (not start) the engine named by ``cfg.engine`` for ``model``."""
    try:
        factory = ENGINES[cfg.engine]
    except KeyError:
        raise ConfigError(f"unknown engine {cfg.engine!r}; one of {sorted(ENGINES)} "
                          "(flag --engine, env DYNAMO_BUS_ENGINE)") from None
    return factory(cfg, model, name)
