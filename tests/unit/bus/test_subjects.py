"""subjects.md and subjects.py list the same names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dynamo_bus.bus.subjects import Names, model_from_token, model_token
from dynamo_bus.errors import ConfigError

DOC = Path(__file__).resolve().parents[3] / "subjects.md"


def _documented() -> dict[str, str]:
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\|\s*(\w+)\s*\|\s*`([^`]+)`", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def test_subjects_md_matches_the_code() -> None:
    assert _documented() == Names("dynamo").all_names()


def test_model_names_escape_into_one_token_and_back() -> None:
    for name in ["SmolLM2-135M-Instruct", "org/model.v1.5", "a b*c>d%e"]:
        token = model_token(name)
        assert not re.search(r"[\s.*>]", token)
        assert model_from_token(token) == name
    assert Names().request_subject("Qwen2.5-7B") == "dyn.dynamo.req.Qwen2%2E5-7B"


def test_bad_names_are_refused_with_the_flag_named() -> None:
    with pytest.raises(ConfigError, match="--namespace"):
        Names("has.dot")
    with pytest.raises(ConfigError, match="--worker-id"):
        Names().work_subject("a.b")


def test_kv_descriptor_subjects_steer_to_a_worker_or_to_any_and_back() -> None:
    names = Names()
    steered = names.kv_subject("org/m.1", "00ff", "dec-1")
    assert steered == "dyn.dynamo.kv.org/m%2E1.to.dec-1.00ff"
    assert names.kv_unsteered(steered) == names.kv_subject("org/m.1", "00ff")
    assert names.kv_unsteered(steered) == "dyn.dynamo.kv.org/m%2E1.any.00ff"
    # Each decode worker's filter and the shared one never overlap (a work queue refuses
    # overlapping consumers): the token after the model differs.
    assert names.kv_claim_filter("org/m.1", "dec-1").split(".")[4] == "to"
    assert names.kv_shared_filter("org/m.1").split(".")[4] == "any"
    assert names.kv_shared_consumer("org/m.1") != names.kv_shared_consumer("org/m.2")
    with pytest.raises(ValueError, match="not a steered"):
        names.kv_unsteered(names.kv_subject("m", "00ff"))
