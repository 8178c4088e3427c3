"""The trace commands of ``dynamo-bus``: ``record``, ``replay`` and ``simulate``.

This module owns their flags (:func:`add_parsers`, called by ``dynamo_bus.cli`` on its
sub-parsers) and running them (:func:`run`). ``replay`` and ``simulate`` write
``PREFIX.md``/``.json``/``.png`` (:mod:`dynamo_bus.traces.report`) and print the summary.
The modules doing the work are imported when a command runs, so building the parser
stays cheap.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
import typing
from pathlib import Path

from dynamo_bus.config import env_name
from dynamo_bus.errors import ConfigError, DynamoBusError
from dynamo_bus.loop import run_loop

COMMANDS = ("record", "replay", "simulate")
_STRATEGIES = ["kv_aware", "round_robin", "random", "least_loaded"]


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


def _add_namespace(p: argparse.ArgumentParser) -> None:
    var = env_name("namespace")
    p.add_argument("--namespace", default=os.environ.get(var, "dynamo"),
                   help=f"namespace of the deployment [env {var}; default dynamo]")


def add_parsers(sub: typing.Any) -> None:
    """Add ``record``, ``replay`` and ``simulate`` to ``sub`` (``add_subparsers()``)."""
    _add_record(sub)
    _add_replay(sub)
    _add_simulate(sub)


def _add_record(sub: typing.Any) -> None:
    rec = sub.add_parser(
        "record", help="write the request log as a Mooncake trace (JSONL)",
        description="Read the JetStream request log and write a Mooncake-compatible trace. "
                    "output_length is each request's max_tokens: the log holds what was "
                    "asked, not what was produced.")
    rec.add_argument("out", metavar="OUT.jsonl", help="the trace file to write")
    rec.add_argument("--nats-url", default=os.environ.get(env_name("nats_url")),
                     help=f"NATS server of the deployment [env {env_name('nats_url')}; "
                          "required]")
    _add_namespace(rec)
    rec.add_argument("--model", default=None, help="only this model's requests (default: all)")
    when = rec.add_mutually_exclusive_group()
    when.add_argument("--since", type=_number(float, 0), metavar="SECONDS_AGO",
                      help="only requests stored in the last SECONDS_AGO seconds "
                           "(default: the whole log)")
    when.add_argument("--all", action="store_true", help="the whole log (the default)")
    rec.add_argument("--follow", action="store_true",
                     help="keep recording new requests until Ctrl-C (default: stop at the "
                          "end of the log)")
    rec.add_argument("--block-size", type=_number(int, 1), default=512,
                     help="tokens per hash id (default 512, as Mooncake)")
    rec.add_argument("--with-tokens", action="store_true",
                     help="also write each prompt's token_ids (a replay sends the real prompt)")


def _add_replay(sub: typing.Any) -> None:
    rep = sub.add_parser(
        "replay", help="replay a Mooncake trace against a deployment and write a report")
    rep.add_argument("trace", metavar="TRACE.jsonl", help="the Mooncake trace to replay")
    target = rep.add_mutually_exclusive_group()
    target.add_argument("--url", default="http://127.0.0.1:8000/v1",
                        help="the HTTP frontend (default %(default)s)")
    target.add_argument("--nats-url", default=None,
                        help="send straight onto NATS instead of through a frontend")
    _add_namespace(rep)
    rep.add_argument("--model", default=None,
                     help="HTTP: the served model name (default: the first served); NATS: the "
                          "model directory (default: SmolLM2)")
    pace = rep.add_mutually_exclusive_group()
    pace.add_argument("--speedup", type=_number(float, 0, above=True), default=1.0,
                      help="send each request at its timestamp / X (default 1)")
    pace.add_argument("--concurrency", type=_number(int, 1), default=None,
                      help="instead keep N requests in flight, in trace order")
    rep.add_argument("--limit", type=_number(int, 1), default=None,
                     help="only the first N requests (default: all)")
    rep.add_argument("--timeout", type=_number(float, 0, above=True), default=600.0,
                     help="seconds one request may take (default 600)")
    rep.add_argument("--out", default=None, metavar="PREFIX",
                     help="report files PREFIX.md/.json/.png (default replay-<time>)")
    rep.add_argument("--vocab-size", type=_number(int, 2), default=None,
                     help="token ids synthesized below V (default: the model's, else 49152)")


def _add_simulate(sub: typing.Any) -> None:
    sim = sub.add_parser(
        "simulate", help="replay a trace offline: the router's policy in front of simulated "
                         "engines, on a virtual clock")
    sim.add_argument("trace", metavar="TRACE.jsonl", help="the Mooncake trace to simulate")
    sim.add_argument("--workers", type=_number(int, 1), default=4,
                     help="simulated workers (default %(default)s)")
    sim.add_argument("--num-blocks", type=_number(int, 1), default=16384,
                     help="KV blocks per worker (default %(default)s)")
    sim.add_argument("--block-size", type=_number(int, 1), default=16,
                     help="tokens per KV block (default %(default)s)")
    sim.add_argument("--host-blocks", type=_number(int, 0), default=0,
                     help="KV blocks per worker in a host-memory tier below the device pool; "
                          "0: none (default %(default)s)")
    sim.add_argument("--host-gib-per-s", type=_number(float, 0, above=True), default=51.0,
                     help="host tier to device copy bandwidth, GiB/s (default %(default)g, "
                          "pinned host to device on an H200)")
    sim.add_argument("--disk-blocks", type=_number(int, 0), default=0,
                     help="KV blocks per worker in a disk tier below the host tier; 0: none "
                          "(default %(default)s)")
    sim.add_argument("--disk-gib-per-s", type=_number(float, 0, above=True), default=1.1,
                     help="disk tier read bandwidth, GiB/s (default %(default)g, O_DIRECT "
                          "reads through NIXL measured here)")
    sim.add_argument("--disk-admit", type=_number(int, 1), default=2,
                     help="requests that must ask for a block before the disk tier takes it "
                          "(default %(default)s; 1: every block)")
    sim.add_argument("--kv-policy", default="lru", choices=["lru", "lfu"],
                     help="eviction policy in every tier (default %(default)s)")
    sim.add_argument("--strategy", default="kv_aware", choices=_STRATEGIES,
                     help="routing strategy: kv_aware (cached prefix + load), round_robin, "
                          "random, least_loaded (default %(default)s)")
    sim.add_argument("--overlap-weight", type=_number(float, 0), default=1.0,
                     help="kv_aware: weight of the prefill cost against the decode cost "
                          "(default %(default)g)")
    sim.add_argument("--temperature", type=_number(float, 0), default=0.0,
                     help="kv_aware: 0 picks the cheapest worker; > 0 samples workers by "
                          "softmax of their normalised costs (default %(default)g)")
    sim.add_argument("--max-batched-tokens", type=_number(int, 1), default=8192,
                     help="tokens one engine step computes at most (default %(default)s)")
    sim.add_argument("--max-num-seqs", type=_number(int, 1), default=256,
                     help="requests one engine runs at once (default %(default)s)")
    sim.add_argument("--engine-speedup", type=_number(float, 0, above=True), default=1.0,
                     help="divide the simulated engine time by this (default %(default)g)")
    sim.add_argument("--speedup", type=_number(float, 0, above=True), default=1.0,
                     help="divide the trace's arrival times by this (default %(default)g)")
    sim.add_argument("--residency-lag-ms", type=_number(float, 0), default=0.0,
                     help="delay between an engine's cache change and the router seeing it "
                          "(default %(default)g)")
    _add_disagg_args(sim)
    sim.add_argument("--limit", type=_number(int, 1), default=None,
                     help="only the first N requests (default: all)")
    sim.add_argument("--out", default=None, metavar="PREFIX",
                     help="report files PREFIX.md/.json/.png (default simulate-<time>)")


def _add_disagg_args(sim: argparse.ArgumentParser) -> None:
    sim.add_argument("--prefill-workers", type=_number(int, 0), default=0,
                     help="disaggregated: this many prefill workers, and --workers decode "
                          "workers (default %(default)s: aggregated)")
    sim.add_argument("--disagg-min-prefill-tokens", type=_number(int, 0), default=1000,
                     help="disaggregated: uncached prompt tokens on the chosen decode worker "
                          "that send a request to a prefill worker (default %(default)s)")
    sim.add_argument("--transfer-gb-per-s", type=_number(float, 0, above=True), default=50.0,
                     help="disaggregated: KV transfer bandwidth, prefill host tier to decode "
                          "worker, in GB/s (default %(default)g)")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the trace command ``args.command``; ``argv`` is quoted in the report. A
    ``ConfigError`` propagates (the caller reports it as a usage error); any other
    failure is printed and gives exit status 1."""
    try:
        if args.command == "record":
            return _record(args)
        if args.command == "replay":
            return _replay(args, argv)
        return _simulate(args, argv)
    except ConfigError:
        raise
    except DynamoBusError as exc:
        print(f"dynamo-bus {args.command}: error: {exc.message}", file=sys.stderr)
        return 1


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


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _record(args: argparse.Namespace) -> int:
    from dynamo_bus.traces.record import record_main

    if not args.nats_url:
        raise ConfigError(f"record needs the deployment's NATS server: pass --nats-url "
                          f"(env {env_name('nats_url')})")
    run_loop(record_main(args.out, args.nats_url, namespace=args.namespace,
                         model=args.model, since=args.since, follow=args.follow,
                         block_size=args.block_size, with_tokens=args.with_tokens))
    return 0


def _replay(args: argparse.Namespace, argv: list[str]) -> int:
    from dynamo_bus.traces.mooncake import read_trace
    from dynamo_bus.traces.record import stop_on_signal
    from dynamo_bus.traces.replay import ReplaySettings, replay

    stamp = _stamp()
    trace = read_trace(args.trace, limit=args.limit)
    meta = _run_meta(argv, args.trace, trace)
    rs = ReplaySettings(target=args.nats_url or args.url, model=args.model,
                        speedup=args.speedup, concurrency=args.concurrency,
                        timeout=args.timeout, vocab_size=args.vocab_size,
                        namespace=args.namespace)

    async def _run() -> tuple[list[typing.Any], dict[str, object]]:
        return await replay(trace, rs, stop=stop_on_signal())

    records, run_meta = run_loop(_run())
    _write_report(args.out or f"replay-{stamp}", records,
                  f"Replay of {Path(args.trace).name}", {**meta, **run_meta})
    return 0


def _simulate(args: argparse.Namespace, argv: list[str]) -> int:
    from dynamo_bus.routing.policy import KvWeights
    from dynamo_bus.traces.mooncake import read_trace
    from dynamo_bus.traces.simulate import SimSettings, simulate

    stamp = _stamp()
    trace = read_trace(args.trace, limit=args.limit)
    meta = _run_meta(argv, args.trace, trace)
    s = SimSettings(workers=args.workers, num_blocks=args.num_blocks,
                    block_size=args.block_size, strategy=args.strategy,
                    weights=KvWeights(overlap_weight=args.overlap_weight,
                                      temperature=args.temperature),
                    max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens,
                    engine_speedup=args.engine_speedup, arrival_speedup=args.speedup,
                    residency_lag=args.residency_lag_ms / 1000, host_blocks=args.host_blocks,
                    host_bandwidth=args.host_gib_per_s * 2**30, disk_blocks=args.disk_blocks,
                    disk_bandwidth=args.disk_gib_per_s * 2**30, disk_admit=args.disk_admit,
                    kv_policy=args.kv_policy, prefill_workers=args.prefill_workers,
                    disagg_min_prefill_tokens=args.disagg_min_prefill_tokens,
                    transfer_bandwidth=args.transfer_gb_per_s * 1e9)
    result = simulate(trace, s)
    shown = {k: v for k, v in vars(s).items() if k != "weights"}
    shown.update(overlap_weight=s.weights.overlap_weight, temperature=s.weights.temperature)
    meta.update(settings=shown, wall_s=round(result.wall_s, 3),
                preemptions=result.preemptions,
                requests_per_worker=dict(sorted(result.per_worker.items())))
    _write_report(args.out or f"simulate-{stamp}", result.records,
                  f"Simulation of {Path(args.trace).name}", meta)
    return 0
