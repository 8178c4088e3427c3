"""Record, replay and simulate as a user runs them: the `dynamo-bus` command against a
real stack (nats-server, router, mock workers, HTTP frontend), reading the files it
writes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest

from dynamo_bus import cli
from dynamo_bus.bus.subjects import Names
from dynamo_bus.traces.mooncake import TraceRequest, read_trace, write_trace

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"


async def _complete(url: str, prompt: list[int]) -> None:
    async with aiohttp.ClientSession() as http, http.post(
            url + "/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 4,
                                        "ignore_eos": True}) as resp:
        assert resp.status == 200, await resp.text()


def _cli(*argv: str) -> Any:
    """Run the command in a thread (it runs its own event loop, as from a shell)."""
    return asyncio.to_thread(cli.main, list(argv))


async def test_record_writes_one_line_per_request(stack, tmp_path: Path) -> None:
    s = await stack(workers=2)
    a = [(7 * i) % 40000 + 1 for i in range(600)]    # one full 512-token block, then more
    b = [(11 * i) % 40000 + 3 for i in range(1100)]  # two full blocks, then more
    prompts = [a + [100 + i] * (5 + i) for i in range(3)] + \
              [b + [200 + i] * (9 + i) for i in range(3)]
    for p in prompts:
        await _complete(s.base_url, p)
    # A worker handing a request back re-publishes it to the log: still one request.
    names = Names(s.cfg.namespace)
    nc = await nats.connect(s.nats_url)
    js = nc.jetstream()
    first = await js.get_msg(names.request_stream, 1)
    await js.publish(first.subject, first.data, headers={"Nats-Msg-Id": "again:handback"})
    await nc.close()

    out, full = tmp_path / "rec.jsonl", tmp_path / "rec-tokens.jsonl"
    assert await _cli("record", str(out), "--nats-url", s.nats_url) == 0
    trace = read_trace(out)
    assert len(trace) == len(out.read_text().splitlines()) == 6
    assert trace[0].timestamp == 0
    assert sorted(r.input_length for r in trace) == sorted(len(p) for p in prompts)
    assert all(r.output_length == 4 and r.model == MODEL and r.token_ids is None
               for r in trace)
    assert all(len(r.hash_ids) == -(-r.input_length // 512) for r in trace)
    with_a = [r.hash_ids for r in trace if r.input_length < 1000]
    with_b = [r.hash_ids for r in trace if r.input_length > 1000]
    assert len({h[0] for h in with_a}) == 1 and len({tuple(h[:2]) for h in with_b}) == 1
    assert with_a[0][0] != with_b[0][0]
    assert len({h[-1] for h in with_a + with_b}) == 6  # the differing tails
    assert sorted({i for h in with_a + with_b for i in h}) == list(range(1 + 3 + 2 + 3))

    assert await _cli("record", str(full), "--nats-url", s.nats_url, "--with-tokens",
                      "--model", MODEL) == 0
    recorded = read_trace(full)
    assert sorted(r.token_ids for r in recorded) == sorted(prompts)  # type: ignore[type-var]
    assert [r.hash_ids for r in recorded] == [r.hash_ids for r in trace]
    # Recording left no consumer behind: the routers' is the only one.
    nc = await nats.connect(s.nats_url)
    consumers = await nc.jetstream().consumers_info(names.request_stream)
    await nc.close()
    assert [c.name for c in consumers] == ["router"]


def _conversations(path: Path, *, turns: int = 4, conversations: int = 3) -> list[TraceRequest]:
    """Conversations whose every turn extends the previous one's prompt, interleaved."""
    reqs = [TraceRequest(timestamp=(t * conversations + c) * 1000,
                         input_length=512 * (t + 1) - 100, output_length=8,
                         hash_ids=[c * 100 + j for j in range(t + 1)])
            for t in range(turns) for c in range(conversations)]
    write_trace(path, reqs)
    return reqs


@pytest.mark.parametrize("transport", ["http", "nats"])
async def test_replay_measures_every_request(stack, model_dir, tmp_path: Path,
                                             transport: str) -> None:
    s = await stack(workers=2)
    trace = tmp_path / "conv.jsonl"
    reqs = _conversations(trace)
    # A request the server refuses (token id outside the vocabulary) fails alone.
    with trace.open("a") as f:
        f.write(json.dumps({"timestamp": 12000, "input_length": 3, "output_length": 2,
                            "token_ids": [1, 2, 10**6]}) + "\n")
    prefix = tmp_path / "out" / "rep"
    target = (["--url", s.base_url, "--speedup", "20"] if transport == "http" else
              ["--nats-url", s.nats_url, "--model", str(model_dir.path), "--concurrency", "2"])
    assert await _cli("replay", str(trace), *target, "--timeout", "30",
                      "--out", str(prefix)) == 0
    for ext in ("md", "json", "png"):
        assert prefix.with_name(f"rep.{ext}").stat().st_size > 0
    report = json.loads(prefix.with_name("rep.json").read_text())
    records = report["records"]
    assert report["summary"]["requests"] == 13 and report["summary"]["completed"] == 12
    bad = records[-1]
    assert bad["error"].startswith("400") and "vocabulary" in bad["error"]
    for rec, req in zip(records, reqs, strict=False):
        assert rec.get("error") is None
        assert rec["prompt_tokens"] == req.input_length and rec["output_tokens"] == 8
        assert 0 < rec["ttft_ms"] <= rec["e2e_ms"] and rec["itl_ms"] >= 0
    assert report["summary"]["prefix_hit_rate"] > 0
    assert any(r["cached_tokens"] > 0 for r in records)
    assert report["meta"]["target"] == (s.base_url if transport == "http" else s.nats_url)
    md = prefix.with_name("rep.md").read_text()
    assert "prefix hit rate" in md and "TTFT" in md and "conv.jsonl" in md


def test_simulate_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "conv.jsonl"
    _conversations(trace)
    prefix = tmp_path / "sim"
    assert cli.main(["simulate", str(trace), "--workers", "2", "--limit", "9",
                     "--out", str(prefix)]) == 0
    report = json.loads((tmp_path / "sim.json").read_text())
    assert report["summary"]["completed"] == 9 and report["summary"]["prefix_hit_rate"] > 0
    assert report["meta"]["settings"]["workers"] == 2
    assert report["meta"]["wall_s"] >= 0
    assert (tmp_path / "sim.png").read_bytes()[:4] == b"\x89PNG"
    assert "| completed | 9 |" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["simulate", "replay"])
def test_malformed_trace_names_file_and_line(tmp_path: Path, command: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "bad.jsonl"
    _conversations(trace, turns=1, conversations=2)
    with trace.open("a") as f:
        f.write('{"timestamp": 5, "input_length": "many"}\n')
    assert cli.main([command, str(trace), "--out", str(tmp_path / "x")]) != 0
    assert f"{trace}:3" in capsys.readouterr().err
    assert not (tmp_path / "x.md").exists()
