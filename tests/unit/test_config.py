"""Settings resolve CLI > env > file > default, and errors name the flag and variable."""

from __future__ import annotations

import pytest

from dynamo_bus.cli import build_parser
from dynamo_bus.config import resolve
from dynamo_bus.errors import ConfigError


def test_precedence(tmp_path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('http_port = 1111\nworkers = 3\nnamespace = "file"\n')
    env = {"DYNAMO_BUS_HTTP_PORT": "2222", "DYNAMO_BUS_WORKERS": "5"}
    cfg = resolve({"http_port": 3333}, config_file=str(f), environ=env)
    assert (cfg.http_port, cfg.workers, cfg.namespace, cfg.engine) == (3333, 5, "file", "reference")


def test_bad_value_names_flag_and_env() -> None:
    with pytest.raises(ConfigError, match=r"--mock-speedup.*DYNAMO_BUS_MOCK_SPEEDUP"):
        resolve({}, environ={"DYNAMO_BUS_MOCK_SPEEDUP": "fast"})


def test_unknown_file_keys_are_refused(tmp_path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("htp_port = 1\n")
    with pytest.raises(ConfigError, match="htp_port"):
        resolve({}, config_file=str(f), environ={})


def test_every_setting_is_a_flag() -> None:
    args = build_parser().parse_args(["serve", "--workers", "4", "--mock-speedup", "1000"])
    assert (args.workers, args.mock_speedup, args.http_port) == (4, 1000.0, None)


def test_roles_other_than_serve_need_a_nats_url(capsys) -> None:
    from dynamo_bus.cli import main

    assert main(["router"]) == 2
    assert "--nats-url" in capsys.readouterr().err
