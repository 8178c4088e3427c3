"""The engines package: the :class:`Engine` interface and its messages (from
:mod:`dynamo_bus.engines.base`) and the engine registry (:func:`make_engine`,
``ENGINES``). Backends are imported only when chosen, so heavy optional dependencies
(torch, vllm, sglang) are never imported by roles that do not run them."""

from __future__ import annotations

from collections.abc import Callable

from dynamo_bus.config import Config
from dynamo_bus.engines.base import (
    Engine,
    EngineLoad,
    EngineOutput,
    EngineRequest,
    KVBlocks,
    KVLayout,
)
from dynamo_bus.errors import ConfigError
from dynamo_bus.kvbm.files import blocks_in
from dynamo_bus.kvbm.policy import POLICIES
from dynamo_bus.models.modeldir import ModelDir

__all__ = ["ENGINES", "Engine", "EngineLoad", "EngineOutput", "EngineRequest", "KVBlocks",
           "KVLayout", "make_engine"]


def _mock(cfg: Config, model: ModelDir, name: str) -> Engine:
    from dynamo_bus.engines.mock import KV_BYTES_PER_TOKEN, MockEngine

    block_bytes = KV_BYTES_PER_TOKEN * cfg.block_size
    host_blocks = int(cfg.kvbm_host_gib * 2**30) // block_bytes
    return MockEngine(name, vocab_size=model.vocab_size, eos_token_ids=model.eos_token_ids,
                      context_length=model.context_length, block_size=cfg.block_size,
                      num_blocks=cfg.num_blocks or 16384, max_num_seqs=cfg.max_concurrency,
                      max_num_batched_tokens=cfg.max_batched_tokens or 8192,
                      speedup=cfg.mock_speedup, host_blocks=host_blocks,
                      kv_policy=cfg.kvbm_policy, kv_offload=cfg.kvbm_offload,
                      disk_blocks=blocks_in(cfg.kvbm_disk_gib, block_bytes),
                      disk_admit_after=cfg.kvbm_disk_admit)


def _reference(cfg: Config, model: ModelDir, name: str) -> Engine:
    try:
        from dynamo_bus.engines.reference.engine import ReferenceEngine
    except ImportError as exc:
        raise ConfigError(f"the reference engine needs PyTorch and safetensors ({exc}); "
                          "pip install torch safetensors") from exc
    try:
        return ReferenceEngine(model, served_name=name, dtype=cfg.dtype, device=cfg.device,
                               threads=cfg.threads, block_size=cfg.block_size,
                               num_blocks=cfg.num_blocks, kv_cache_gib=cfg.kv_cache_gib,
                               max_num_seqs=cfg.max_concurrency,
                               max_num_batched_tokens=cfg.max_batched_tokens or 1024,
                               cuda_graphs=cfg.cuda_graphs, host_gib=cfg.kvbm_host_gib,
                               kv_policy=cfg.kvbm_policy, kv_offload=cfg.kvbm_offload,
                               disk_gib=cfg.kvbm_disk_gib, disk_dir=cfg.kvbm_disk_dir,
                               disk_admit_after=cfg.kvbm_disk_admit)
    except (ValueError, NotImplementedError) as exc:
        raise ConfigError(f"reference engine: {exc}") from exc


ENGINES: dict[str, Callable[[Config, ModelDir, str], Engine]] = {
    "reference": _reference, "mock": _mock}


def make_engine(cfg: Config, model: ModelDir, name: str) -> Engine:
    """Build (not start) the engine named by ``cfg.engine`` for ``model``."""
    try:
        factory = ENGINES[cfg.engine]
    except KeyError:
        raise ConfigError(f"unknown engine {cfg.engine!r}; one of {sorted(ENGINES)} "
                          "(flag --engine, env DYNAMO_BUS_ENGINE)") from None
    if cfg.kvbm_policy not in POLICIES:
        raise ConfigError(f"unknown eviction policy {cfg.kvbm_policy!r}; one of "
                          f"{', '.join(POLICIES)} (flag --kvbm-policy, env DYNAMO_BUS_KVBM_POLICY)")
    if cfg.kvbm_offload not in ("evict", "write-through"):
        raise ConfigError(f"unknown offload mode {cfg.kvbm_offload!r}; one of evict, "
                          "write-through (flag --kvbm-offload, env DYNAMO_BUS_KVBM_OFFLOAD)")
    if cfg.kvbm_host_gib < 0:
        raise ConfigError("--kvbm-host-gib must be >= 0 (0: no host tier)")
    if cfg.kvbm_disk_gib < 0:
        raise ConfigError("--kvbm-disk-gib must be >= 0 (0: no disk tier)")
    if cfg.kvbm_disk_gib > 0:
        if cfg.kvbm_host_gib <= 0:
            raise ConfigError("the disk tier (--kvbm-disk-gib) sits under the host tier: "
                              "give --kvbm-host-gib too")
        if not cfg.kvbm_disk_dir and cfg.engine != "mock":
            raise ConfigError("--kvbm-disk-gib needs --kvbm-disk-dir: the directory for "
                              "the disk tier's block files")
    elif cfg.kvbm_disk_dir:
        raise ConfigError("--kvbm-disk-dir is set but --kvbm-disk-gib is 0: give the "
                          "disk tier a size, or leave both unset")
    if cfg.kvbm_disk_admit < 1:
        raise ConfigError("--kvbm-disk-admit must be >= 1 (1: every block the host tier "
                          "evicts is written)")
    return factory(cfg, model, name)
