"""The ``dynamo-bus`` command line as a user meets it: --help, --version, flag spellings."""

from __future__ import annotations

import argparse
import re

import pytest

from dynamo_bus.cli import build_parser, main


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    assert parser._subparsers is not None
    (group,) = (a for a in parser._subparsers._group_actions
                if isinstance(a, argparse._SubParsersAction))
    return dict(group.choices)


def test_every_flag_of_every_subcommand_explains_itself() -> None:
    commands = _subcommands()
    assert {"serve", "frontend", "router", "worker", "nats", "model", "record", "replay",
            "simulate"} <= set(commands)
    missing = [f"{name} {action.option_strings or action.dest}"
               for name, p in commands.items() for action in p._actions
               if "-h" not in action.option_strings and not (action.help or "").strip()]
    assert missing == []


def test_simulate_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["simulate", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [("--workers", "4"), ("--block-size", "16"),
                          ("--strategy", "kv_aware"), ("--max-num-seqs", "256"),
                          ("--max-batched-tokens", "8192")]:
        assert re.search(re.escape(flag) + r" \S+ [^-]*default " + re.escape(default), text), flag


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert re.fullmatch(r"dynamo-bus \S+\n", out), out


@pytest.mark.parametrize("command", ["serve", "frontend"])
def test_host_and_port_are_aliases_of_the_http_flags(command: str) -> None:
    args = build_parser().parse_args([command, "--host", "0.0.0.0", "--port", "9"])
    assert (args.http_host, args.http_port) == ("0.0.0.0", 9)
    help_text = _subcommands()[command].format_help()
    assert "--http-port HTTP_PORT, --port HTTP_PORT" in help_text
