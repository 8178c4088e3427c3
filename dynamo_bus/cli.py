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
``PREFIX.md``/``.json``/``.png`` (``dynamo_bus.traces.report``) and print the summary.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import platform
import shlex
import signal
import sys
import time
import types
import typing
from pathlib import Path

import msgspec

from dynamo_bus.config import Config, env_name, flag_name, resolve
from dynamo_bus.errors import ConfigError, DynamoBusError

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


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(Config)
    for f in msgspec.structs.fields(Config):
        default = "unset" if f.default is None else f.default
        p.add_argument(flag_name(f.name), dest=f.name, type=_arg_type(hints[f.name]),
                       default=None, metavar=f.name.upper(),
                       help=f"{_HELP.get(f.name, '')} [env {env_name(f.name)}; "
                            f"default {default}]")
    p.add_argument("--config", help="TOML file with settings (lowest precedence but defaults)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynamo-bus",
                                     description="LLM serving over NATS JetStream")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [("serve", "run everything in one process (embedded NATS by default)"),
                        ("frontend", "run the OpenAI HTTP frontend"),
                        ("router", "run a router replica"),
                        ("worker", "run worker(s)")]:
        _add_config_flags(sub.add_parser(name, help=help_))
    nats = sub.add_parser("nats", help="run a nats-server with JetStream on 127.0.0.1")
    nats.add_argument("--port", type=int, default=4222, help="0: any free port")
    nats.add_argument("--store-dir", type=Path, default=None)
    model = sub.add_parser("model", help="fetch/build the model directory, print its path")
    model.add_argument("--model", default=None)
    _add_trace_commands(sub)
    return parser


def _number(kind: type[int] | type[float], lo: float, *, above: bool = False
            ) -> typing.Callable[[str], float]:
    """A flag parser for numbers >= lo (> lo with ``above``); argparse names the flag."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if value < lo or (above and value == lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if above else '>='} {lo:g}, "
                                             f"got {text}")
        return value
    return parse


def _add_trace_commands(sub: typing.Any) -> None:
    namespace = os.environ.get(env_name("namespace"), "dynamo")
    rec = sub.add_parser(
        "record", help="write the request log as a Mooncake trace (JSONL)",
        description="Read the JetStream request log and write a Mooncake-compatible trace. "
                    "output_length is each request's max_tokens: the log holds what was "
                    "asked, not what was produced.")
    rec.add_argument("out", metavar="OUT.jsonl")
    rec.add_argument("--nats-url", default=os.environ.get(env_name("nats_url")),
                     help=f"NATS server of the deployment [env {env_name('nats_url')}]")
    rec.add_argument("--namespace", default=namespace)
    rec.add_argument("--model", default=None, help="only this model's requests (default: all)")
    when = rec.add_mutually_exclusive_group()
    when.add_argument("--since", type=_number(float, 0), metavar="SECONDS_AGO",
                      help="only requests stored in the last SECONDS_AGO seconds")
    when.add_argument("--all", action="store_true", help="the whole log (the default)")
    rec.add_argument("--follow", action="store_true",
                     help="keep recording new requests until Ctrl-C")
    rec.add_argument("--block-size", type=_number(int, 1), default=512,
                     help="tokens per hash id (default 512, as Mooncake)")
    rec.add_argument("--with-tokens", action="store_true",
                     help="also write each prompt's token_ids (a replay sends the real prompt)")

    rep = sub.add_parser(
        "replay", help="replay a Mooncake trace against a deployment and write a report")
    rep.add_argument("trace", metavar="TRACE.jsonl")
    target = rep.add_mutually_exclusive_group()
    target.add_argument("--url", default="http://127.0.0.1:8000/v1",
                        help="the HTTP frontend (default http://127.0.0.1:8000/v1)")
    target.add_argument("--nats-url", default=None,
                        help="send straight onto NATS instead of through a frontend")
    rep.add_argument("--namespace", default=namespace)
    rep.add_argument("--model", default=None,
                     help="HTTP: the served model name (default: the first served); NATS: the "
                          "model directory (default: SmolLM2)")
    pace = rep.add_mutually_exclusive_group()
    pace.add_argument("--speedup", type=_number(float, 0, above=True), default=1.0,
                      help="send each request at its timestamp / X (default 1)")
    pace.add_argument("--concurrency", type=_number(int, 1), default=None,
                      help="instead keep N requests in flight, in trace order")
    rep.add_argument("--limit", type=_number(int, 1), default=None,
                     help="only the first N requests")
    rep.add_argument("--timeout", type=_number(float, 0, above=True), default=600.0,
                     help="seconds one request may take (default 600)")
    rep.add_argument("--out", default=None, metavar="PREFIX",
                     help="report files PREFIX.md/.json/.png (default replay-<time>)")
    rep.add_argument("--vocab-size", type=_number(int, 2), default=None,
                     help="token ids synthesized below V (default: the model's, else 49152)")

    sim = sub.add_parser(
        "simulate", help="replay a trace offline: the router's policy in front of simulated "
                         "engines, on a virtual clock")
    sim.add_argument("trace", metavar="TRACE.jsonl")
    sim.add_argument("--workers", type=_number(int, 1), default=4)
    sim.add_argument("--num-blocks", type=_number(int, 1), default=16384,
                     help="KV blocks per worker")
    sim.add_argument("--block-size", type=_number(int, 1), default=16)
    sim.add_argument("--strategy", default="kv_aware",
                     choices=["kv_aware", "round_robin", "random", "least_loaded"])
    sim.add_argument("--overlap-weight", type=_number(float, 0), default=1.0)
    sim.add_argument("--temperature", type=_number(float, 0), default=0.0)
    sim.add_argument("--max-batched-tokens", type=_number(int, 1), default=8192)
    sim.add_argument("--max-num-seqs", type=_number(int, 1), default=256)
    sim.add_argument("--engine-speedup", type=_number(float, 0, above=True), default=1.0,
                     help="divide the simulated engine time by this")
    sim.add_argument("--speedup", type=_number(float, 0, above=True), default=1.0,
                     help="divide the trace's arrival times by this")
    sim.add_argument("--residency-lag-ms", type=_number(float, 0), default=0.0,
                     help="delay between an engine's cache change and the router seeing it")
    sim.add_argument("--limit", type=_number(int, 1), default=None,
                     help="only the first N requests")
    sim.add_argument("--out", default=None, metavar="PREFIX",
                     help="report files PREFIX.md/.json/.png (default simulate-<time>)")


def _run_meta(argv: list[str], trace_path: str, trace: list[typing.Any]) -> dict[str, object]:
    from dynamo_bus.traces.mooncake import summary_line

    return {"command": "dynamo-bus " + shlex.join(argv),
            "trace": f"{trace_path} ({summary_line(trace)})",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": f"{platform.node()}, {platform.platform()}, {os.cpu_count()} CPUs, "
                       f"Python {platform.python_version()}"}


def _write_report(prefix: str, records: list[typing.Any], title: str,
                  meta: dict[str, object]) -> None:
    from dynamo_bus.traces.report import format_summary, write_report

    summary = write_report(prefix, records, title=title, meta=meta)
    print(format_summary(summary))
    print(f"report: {prefix}.md, {prefix}.json, {prefix}.png")


def _run_trace_command(args: argparse.Namespace, argv: list[str]) -> int:
    from dynamo_bus.traces.mooncake import read_trace

    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.command == "record":
        from dynamo_bus.traces.record import record_main

        if not args.nats_url:
            raise ConfigError(f"record needs the deployment's NATS server: pass --nats-url "
                              f"(env {env_name('nats_url')})")
        run_loop(record_main(args.out, args.nats_url, namespace=args.namespace,
                             model=args.model, since=args.since, follow=args.follow,
                             block_size=args.block_size, with_tokens=args.with_tokens))
        return 0
    trace = read_trace(args.trace, limit=args.limit)
    meta = _run_meta(argv, args.trace, trace)
    if args.command == "replay":
        from dynamo_bus.traces.record import stop_on_signal
        from dynamo_bus.traces.replay import ReplaySettings, replay

        rs = ReplaySettings(target=args.nats_url or args.url, model=args.model,
                            speedup=args.speedup, concurrency=args.concurrency,
                            timeout=args.timeout, vocab_size=args.vocab_size,
                            namespace=args.namespace)

        async def _replay() -> tuple[list[typing.Any], dict[str, object]]:
            return await replay(trace, rs, stop=stop_on_signal())

        records, run = run_loop(_replay())
        _write_report(args.out or f"replay-{stamp}", records,
                      f"Replay of {Path(args.trace).name}", {**meta, **run})
        return 0
    from dynamo_bus.routing.policy import KvWeights
    from dynamo_bus.traces.simulate import SimSettings, simulate

    s = SimSettings(workers=args.workers, num_blocks=args.num_blocks,
                    block_size=args.block_size, strategy=args.strategy,
                    weights=KvWeights(overlap_weight=args.overlap_weight,
                                      temperature=args.temperature),
                    max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens,
                    engine_speedup=args.engine_speedup, arrival_speedup=args.speedup,
                    residency_lag=args.residency_lag_ms / 1000)
    result = simulate(trace, s)
    shown = {k: v for k, v in vars(s).items() if k != "weights"}
    shown.update(overlap_weight=s.weights.overlap_weight, temperature=s.weights.temperature)
    meta.update(settings=shown, wall_s=round(result.wall_s, 3),
                preemptions=result.preemptions,
                requests_per_worker=dict(sorted(result.per_worker.items())))
    _write_report(args.out or f"simulate-{stamp}", result.records,
                  f"Simulation of {Path(args.trace).name}", meta)
    return 0


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("record", "replay", "simulate"):
            try:
                return _run_trace_command(args, argv)
            except ConfigError:
                raise
            except DynamoBusError as exc:
                print(f"dynamo-bus {args.command}: error: {exc.message}", file=sys.stderr)
                return 1
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
