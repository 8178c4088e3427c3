"""Configuration: one frozen Struct per process, resolved once.

Precedence: command-line flag > environment variable ``DYNAMO_BUS_<FIELD>`` > TOML file
(``--config``) > the default here. Every error names the flag and the variable.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from dynamo_bus.errors import ConfigError

ENV_PREFIX = "DYNAMO_BUS_"


class Config(msgspec.Struct, frozen=True, kw_only=True):
    # where
    nats_url: str | None = None          # None: start an embedded nats-server
    namespace: str = "dynamo"
    store_dir: str | None = None         # embedded server's JetStream store
    # model
    model: str | None = None             # HF-format dir; None: SmolLM2 from the cache
    served_model_name: str | None = None
    context_length: int = 0              # 0: the model's (max_position_embeddings)
    # frontend
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    request_timeout: float = 600.0       # seconds a request may take end to end
    max_inflight: int = 4096             # per frontend; beyond it: 429
    fold_chunks: bool = True             # merge chunks already waiting into one event
    # router
    router_mode: str = "kv_aware"
    router_ack_wait: float = 10.0        # a dead router's requests come back after this
    router_max_inflight: int = 512
    router_overlap_weight: float = 1.0   # kv_aware: weight of the prefill term
    router_temperature: float = 0.0      # kv_aware: > 0 samples workers by softmax
    router_busy_kv: float = 0.0          # busy at this share of KV blocks active; 0: off
    router_busy_prefill_tokens: int = 0  # busy at this many queued prefill tokens; 0: off
    router_queue_size: int = 0           # requests waiting while all busy; 0: answer 503
    # worker
    engine: str = "reference"
    worker_id: str | None = None
    workers: int = 1                     # aggregated workers started by `serve`
    frontend_process: bool = True        # serve: HTTP frontend in a child process
    max_concurrency: int = 64            # requests one worker runs at once
    heartbeat_interval: float = 1.0
    worker_ttl: float = 5.0              # registration expires this long after a heartbeat
    drain_timeout: float = 30.0
    # disaggregated prefill/decode
    role: Literal["aggregated", "prefill", "decode"] = "aggregated"  # worker
    disagg: bool = False                 # serve: one prefill + one decode worker
    disagg_min_prefill_tokens: int = 1000  # uncached prompt tokens worth a prefill worker
    disagg_affinity: bool = True         # steer descriptors to the router's decode choice
    kv_lease_s: float = 30.0             # lent blocks stay pinned at most this long
    kv_transfer_timeout: float = 10.0    # a decode worker's READ of one request's blocks
    # engines
    block_size: int = 16
    num_blocks: int = 0                  # 0: mock 16384; reference sized by kv_cache_gib
    max_batched_tokens: int = 0          # chunked-prefill budget; 0: the engine's default
    mock_speedup: float = 1.0
    dtype: str = "auto"                  # reference: auto, bfloat16, float32
    device: str = "auto"                 # reference: auto, cpu, cuda, cuda:N
    threads: int = 0                     # reference on CPU: torch threads; 0: every core
    kv_cache_gib: float = 1.0            # reference: KV cache size when num_blocks is 0
    cuda_graphs: bool = True             # reference on CUDA: decode steps from CUDA graphs
    # KV block manager: tiers under each worker's device pool
    kvbm_host_gib: float = 2.0           # G2 host-memory tier per worker; 0: off
    kvbm_policy: str = "lru"             # eviction in every tier: lru, lfu
    kvbm_offload: str = "evict"          # copy to G2 on eviction, or every block written
    kvbm_disk_gib: float = 0.0           # G3 disk tier per worker; 0: off
    kvbm_disk_dir: str = ""              # where G3 keeps its block files
    kvbm_disk_admit: int = 2             # requests that must ask for a block before G3 takes it
    # logging
    log_level: str = "info"


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def to_env(cfg: Config) -> dict[str, str]:
    """The settings as ``DYNAMO_BUS_*`` variables: how a process passes its resolved
    configuration to a child it starts."""
    env = {}
    for name, value in msgspec.structs.asdict(cfg).items():
        if value is not None:
            env[env_name(name)] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def resolve(cli: dict[str, Any], *, config_file: str | None = None,
            environ: dict[str, str] | None = None) -> Config:
    """Merge the layers. ``cli`` holds only flags the user actually gave."""
    environ = dict(os.environ if environ is None else environ)
    fields = {f.name: f for f in msgspec.structs.fields(Config)}
    merged: dict[str, Any] = {}
    config_file = config_file or environ.get(env_name("config"))
    if config_file:
        try:
            merged.update(tomllib.loads(Path(config_file).read_text()))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc} "
                              f"(flag --config, env {env_name('config')})") from exc
        unknown = set(merged) - set(fields)
        if unknown:
            raise ConfigError(f"unknown settings in {config_file}: {sorted(unknown)}")
    for name in fields:
        if env_name(name) in environ:
            merged[name] = environ[env_name(name)]
    merged.update({k: v for k, v in cli.items() if v is not None})
    try:
        return msgspec.convert(merged, Config, strict=False)
    except msgspec.ValidationError as exc:
        # msgspec says "... - at `$.http_port`": name the flag and variable instead.
        msg = str(exc)
        field = msg.rsplit("$.", 1)[-1].rstrip("`") if "$." in msg else ""
        hint = f" (flag {flag_name(field)}, env {env_name(field)})" if field in fields else ""
        raise ConfigError(f"invalid setting: {msg}{hint}") from exc
