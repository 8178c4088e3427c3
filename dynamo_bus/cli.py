"""The ``dynamo-bus`` command.

    dynamo-bus serve                 everything in one process, embedded nats-server
    dynamo-bus nats                  a nats-server with JetStream on 127.0.0.1
    dynamo-bus frontend|router|worker --nats-url URL    one role per process
    dynamo-bus model                 fetch/build the model directory and print its path
    dynamo-bus record OUT.jsonl      the request log as a Mooncake trace
    dynamo-bus replay TRACE.jsonl    replay a trace against a deployment, write a report
    dynamo-bus simulate TRACE.jsonl  replay it offline (router policy, simulated engines)

Every serving setting is a flag, an environment variable ``DYNAMO_BUS_<NAME>`` or a key
of the ``--config`` TOML file (see ``config.py``). ``replay`` and ``simulate`` write
``PREFIX.md``/``.json``/``.png`` (``dynamo_bus.traces.report``) and print the summary;
their flags and running them live in ``dynamo_bus.traces.commands``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import signal
import sys
import types
import typing
from pathlib import Path
from typing import Any

import msgspec

from dynamo_bus.config import Config, env_name, flag_name, resolve
from dynamo_bus.errors import ConfigError
from dynamo_bus.loop import run_loop
from dynamo_bus.traces import commands as trace_commands

_HELP = {
    "nats_url": "NATS server or cluster URL; serve starts its own when unset",
    "namespace": "isolates deployments that share a NATS cluster",
    "store_dir": "JetStream store of the embedded nats-server (default: user cache)",
    "model": "HF-format model directory (default: SmolLM2-135M-Instruct, fetched once)",
    "served_model_name": "model name clients use (default: the directory's name)",
    "context_length": "longest prompt + output accepted, in tokens (0: the model's "
                      "max_position_embeddings); e.g. to replay long traces on the mock engine",
    "http_host": "frontend bind address",
    "http_port": "frontend port (0: any free port)",
    "request_timeout": "seconds a request may take end to end",
    "max_inflight": "requests one frontend accepts at once; beyond it answers 429",
    "fold_chunks": "a stream whose reader is behind sends the tokens already waiting as "
                   "one event (true), or one event per chunk the worker sent (false)",
    "router_mode": "default routing strategy: kv_aware (cached prefix + load), "
                   "round_robin, random, least_loaded",
    "router_ack_wait": "seconds before a dead router's requests are redelivered",
    "router_max_inflight": "requests one router forwards (or holds in its queue) at once",
    "router_overlap_weight": "kv_aware: weight of the prefill cost against the decode "
                             "cost (higher: favour cache hits over balance)",
    "router_temperature": "kv_aware: 0 picks the cheapest worker; > 0 samples workers by "
                          "softmax of their normalised costs",
    "router_busy_kv": "a worker is busy when this share of its KV blocks is active "
                      "(0: never)",
    "router_busy_prefill_tokens": "a worker is busy with this many prompt tokens waiting "
                                  "to prefill (0: never)",
    "router_queue_size": "requests a router holds, highest priority first, while every "
                         "worker is busy; 0: answer 503 at once",
    "engine": "engine of the workers: reference (PyTorch) or mock (simulated)",
    "worker_id": "worker id (default: engine name + random suffix)",
    "workers": "number of workers this process runs",
    "frontend_process": "serve: run the HTTP frontend in a child process of its own, so "
                        "it and the workers each get a core (true/false)",
    "max_concurrency": "requests one worker runs at once",
    "heartbeat_interval": "seconds between worker heartbeats",
    "worker_ttl": "seconds after the last heartbeat a worker counts as gone",
    "drain_timeout": "seconds a stopping worker waits for in-flight requests",
    "role": "worker: aggregated (prefill and decode), prefill (parks the prompt's KV and "
            "hands it to a decode worker) or decode (claims prefilled KV, decodes; "
            "prefills short prompts itself)",
    "disagg": "serve: one prefill and one decode worker instead of --workers aggregated ones",
    "disagg_min_prefill_tokens": "router: a prompt whose uncached part on the chosen decode "
                                 "worker has at least this many tokens goes to a prefill "
                                 "worker; shorter ones the decode worker prefills itself",
    "disagg_affinity": "router: name the decode worker (cached prefix + load) that claims a "
                       "prefilled request (true), or let any decode worker claim it (false)",
    "kv_lease_s": "seconds a prefill worker keeps lent KV blocks pinned for a decode "
                  "worker that has not read them",
    "kv_transfer_timeout": "seconds a decode worker waits for one request's KV READ before "
                           "it prefills the prompt itself",
    "mock_speedup": "mock engine: divide simulated time by this",
    "block_size": "tokens per KV block",
    "num_blocks": "KV blocks per worker; 0: mock 16384, reference sized by --kv-cache-gib",
    "max_batched_tokens": "tokens one engine step computes at most (chunked prefill "
                          "budget); 0: the engine's default (reference 1024, mock 8192)",
    "dtype": "reference engine: auto, bfloat16 or float32 (auto: bfloat16 on CUDA and on "
             "CPUs with native bfloat16, else float32)",
    "device": "reference engine: auto, cpu, cuda or cuda:N",
    "threads": "reference engine on CPU: PyTorch threads (0: every core this process may use)",
    "kv_cache_gib": "reference engine: KV cache size in GiB when --num-blocks is 0",
    "cuda_graphs": "reference engine on CUDA: replay decode steps from captured CUDA graphs "
                   "(false: every step eager)",
    "kvbm_host_gib": "KV block manager: GiB of host memory per worker for the blocks its "
                     "device pool evicts (G2); 0: no host tier",
    "kvbm_offload": "KV block manager: copy a block to the host tier when the device "
                    "pool evicts it (evict) or as soon as it is computed (write-through)",
    "kvbm_policy": "KV block manager: what each tier evicts first, lru or lfu (least "
                   "frequently used, with aging)",
    "kvbm_disk_gib": "KV block manager: GiB of disk per worker for the blocks the host "
                     "tier evicts (G3, under --kvbm-disk-dir); 0: no disk tier",
    "kvbm_disk_dir": "KV block manager: directory for the disk tier's block files; a "
                     "worker restarted with the same directory finds its blocks again",
    "kvbm_disk_admit": "KV block manager: how many requests must have asked for a block "
                       "before the disk tier takes it (1: every block)",
    "log_level": "debug, info, warning or error",
}


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _arg_type(tp: object) -> typing.Callable[[str], object]:
    """The parser of a Config field annotation (``int | None`` -> int)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is bool:
        return _bool
    return tp if isinstance(tp, type) else str


# Spellings of vLLM and SGLang, accepted too where the HTTP frontend runs.
_ALIASES = {"http_host": ["--host"], "http_port": ["--port"]}


def _add_config_flags(p: argparse.ArgumentParser, *, aliases: bool = False) -> None:
    hints = typing.get_type_hints(Config)
    for f in msgspec.structs.fields(Config):
        default = "unset" if f.default is None else f.default
        names = [flag_name(f.name), *(_ALIASES.get(f.name, []) if aliases else [])]
        # A bare boolean flag means true (``--disagg``); it also takes a value.
        bare: dict[str, Any] = {"nargs": "?", "const": True} if hints[f.name] is bool else {}
        p.add_argument(*names, dest=f.name, type=_arg_type(hints[f.name]),
                       default=None, metavar=f.name.upper(), **bare,
                       help=f"{_HELP.get(f.name, '')} [env {env_name(f.name)}; "
                            f"default {default}]")
    p.add_argument("--config", metavar="FILE.toml",
                   help="TOML file of settings; flags and environment variables override "
                        "it (default: none)")


def _version() -> str:
    try:
        return importlib.metadata.version("dynamo-bus")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynamo-bus",
                                     description="LLM serving over NATS JetStream")
    parser.add_argument("--version", action="version", version=f"dynamo-bus {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [("serve", "run everything in one process (embedded NATS by default)"),
                        ("frontend", "run the OpenAI HTTP frontend"),
                        ("router", "run a router replica"),
                        ("worker", "run worker(s)")]:
        _add_config_flags(sub.add_parser(name, help=help_),
                          aliases=name in ("serve", "frontend"))
    nats = sub.add_parser("nats", help="run a nats-server with JetStream on 127.0.0.1")
    nats.add_argument("--port", type=int, default=4222,
                      help="client port (default %(default)s; 0: any free port)")
    nats.add_argument("--store-dir", type=Path, default=None,
                      help="JetStream store directory (default: nats/ in the user cache, "
                           "$DYNAMO_BUS_CACHE if set)")
    model = sub.add_parser("model", help="fetch/build the model directory, print its path")
    model.add_argument("--model", default=None,
                       help="a local HF-format model directory to check (default: "
                            "SmolLM2-135M-Instruct, fetched into the user cache once)")
    trace_commands.add_parsers(sub)
    return parser


def _run_nats(port: int, store_dir: Path | None) -> int:
    from dynamo_bus.bus.natsserver import EmbeddedNats
    from dynamo_bus.models.modeldir import default_cache_dir

    server = EmbeddedNats(store_dir or default_cache_dir() / "nats", port=port)

    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    url = server.start()
    print(url, flush=True)
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        if args.command in trace_commands.COMMANDS:
            return trace_commands.run(args, argv)
        if args.command == "nats":
            return _run_nats(args.port, args.store_dir)
        if args.command == "model":
            from dynamo_bus.models.modeldir import resolve_model

            print(resolve_model(args.model).path)
            return 0
        cli = {k: v for k, v in vars(args).items()
               if k not in ("command", "config") and v is not None}
        cfg = resolve(cli, config_file=args.config)
        if args.command != "serve" and not cfg.nats_url:
            raise ConfigError(f"{args.command} needs a NATS server: pass --nats-url "
                              f"(env {env_name('nats_url')}), e.g. from `dynamo-bus nats`")
        logging.basicConfig(level=cfg.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from dynamo_bus.roles import run

        run_loop(run(cfg, args.command))
        return 0
    except ConfigError as exc:
        print(f"dynamo-bus: error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
