"""The reference engine end to end on SmolLM2 in float32: greedy output equals transformers
token for token under continuous batching and chunked prefill, the prefix cache and
preemption change no output, sampling honours its options, aborts free every block, and
whole KV blocks survive an export/import round trip."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dynamo_bus.bus.messages import KVDescriptor, SamplingOptions, pack_hashes  # noqa: E402
from dynamo_bus.engines.base import EngineOutput, EngineRequest  # noqa: E402
from dynamo_bus.engines.reference.engine import ReferenceEngine  # noqa: E402
from dynamo_bus.hashing import sequence_hashes  # noqa: E402
from dynamo_bus.kvbm.files import HEADER_BYTES  # noqa: E402
from dynamo_bus.models.modeldir import ModelDir  # noqa: E402

pytestmark = pytest.mark.slow

NEW_TOKENS = 64
BUDGET = 32  # chunked-prefill budget: the long prompt takes several steps
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived",
    "List three colours:",
    ("The history of the printing press begins in the fifteenth century, when Johannes "
     "Gutenberg combined movable metal type, oil-based ink and a wooden screw press. Within "
     "a few decades, printing shops had spread across Europe, and books became cheaper."),
]


@pytest.fixture(scope="module")
def tokenizer(fp32_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(fp32_dir)


@pytest.fixture(scope="module")
def expected(fp32_dir: Path, tokenizer: Any) -> list[list[int]]:
    """transformers' greedy continuations (up to EOS or NEW_TOKENS) of PROMPTS."""
    torch.set_num_threads(2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(fp32_dir, dtype=torch.float32).eval()
    out = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        with torch.inference_mode():
            gen = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS)
        out.append(gen[0, len(ids):].tolist())
    assert max(len(o) for o in out) == NEW_TOKENS  # not a vacuous match on early EOS
    return out


def _engine(fp32_dir: Path, model_dir: ModelDir, **kw: Any) -> ReferenceEngine:
    kw.setdefault("max_num_batched_tokens", BUDGET)
    kw.setdefault("num_blocks", 256)
    return ReferenceEngine(dataclasses.replace(model_dir, path=fp32_dir), dtype="float32",
                           device="cpu", threads=2, **kw)


@pytest.fixture
async def engine(fp32_dir: Path, model_dir: ModelDir) -> AsyncIterator[ReferenceEngine]:
    eng = _engine(fp32_dir, model_dir)
    await eng.start()
    yield eng
    await eng.stop()


def req(rid: str, ids: list[int], **sampling: Any) -> EngineRequest:
    sampling.setdefault("temperature", 0.0)
    sampling.setdefault("max_tokens", NEW_TOKENS)
    return EngineRequest(request_id=rid, token_ids=ids, sampling=SamplingOptions(**sampling))


async def run(engine: ReferenceEngine, request: EngineRequest) -> list[EngineOutput]:
    return [out async for out in engine.generate(request)]


def tokens(outs: list[EngineOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


async def test_greedy_batch_matches_transformers(engine: ReferenceEngine, tokenizer: Any,
                                                 expected: list[list[int]]) -> None:
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    assert max(len(p) for p in prompts) > BUDGET  # one prompt is prefilled in chunks
    # All five at once: different lengths prefill and decode in the same steps.
    results = await asyncio.gather(*(run(engine, req(f"r{i}", p))
                                     for i, p in enumerate(prompts)))
    for prompt, outs, want in zip(PROMPTS, results, expected, strict=True):
        assert tokens(outs) == want, prompt
        assert outs[-1].finish_reason == ("length" if len(want) == NEW_TOKENS else "stop")
    assert engine.pool.num_active == 0


async def test_prefix_cache_hit_gives_the_cold_output(engine: ReferenceEngine, tokenizer: Any,
                                                      expected: list[list[int]]) -> None:
    ids = tokenizer(PROMPTS[4]).input_ids
    cold = await run(engine, req("cold", ids))
    warm = await run(engine, req("warm", ids))
    assert cold[0].cached_tokens == 0
    assert warm[0].cached_tokens == (len(ids) - 1) // 16 * 16 > 0
    assert tokens(warm) == tokens(cold) == expected[4]


async def test_preemption_changes_no_output(fp32_dir: Path, model_dir: ModelDir,
                                            tokenizer: Any, expected: list[list[int]]) -> None:
    # 8 blocks of 16 tokens cannot hold four growing sequences at once.
    eng = _engine(fp32_dir, model_dir, num_blocks=8)
    await eng.start()
    try:
        results = await asyncio.gather(*(run(eng, req(f"p{i}", tokenizer(p).input_ids))
                                         for i, p in enumerate(PROMPTS[:4])))
        assert eng.num_preemptions > 0
        for outs, want in zip(results, expected, strict=False):
            assert tokens(outs) == want
    finally:
        await eng.stop()


async def test_abort_frees_every_block(engine: ReferenceEngine, tokenizer: Any) -> None:
    ids = tokenizer(PROMPTS[4]).input_ids
    gen = engine.generate(req("a", ids, max_tokens=1000))
    first = await anext(gen)
    assert first.token_ids and engine.pool.num_active > 0
    waiting = engine.generate(req("b", ids, max_tokens=1000))  # admitted with the prefix
    second = asyncio.ensure_future(anext(waiting))
    await asyncio.sleep(0)
    await engine.abort("a")
    rest = [o async for o in gen]
    assert rest[-1].finish_reason == "cancelled"
    await second
    await waiting.aclose()  # closing the iterator aborts too
    for _ in range(500):  # blocks go once the step under way has run
        if not engine._planned:
            break
        await asyncio.sleep(0.01)
    load = engine.load()
    assert (load.active_requests, load.waiting_requests, load.active_blocks) == (0, 0, 0)
    assert engine.pool.num_free == engine.num_blocks
    await engine.abort("a")  # unknown now: a no-op


async def test_seeded_sampling_is_reproducible_in_any_batch(engine: ReferenceEngine,
                                                            tokenizer: Any) -> None:
    ids = tokenizer(PROMPTS[2]).input_ids
    opts = dict(temperature=0.9, top_p=0.95, top_k=50, max_tokens=24, ignore_eos=True)
    alone = tokens(await run(engine, req("s1", ids, seed=7, **opts)))
    crowd = await asyncio.gather(run(engine, req("s2", ids, seed=7, **opts)),
                                 run(engine, req("s3", ids, seed=8, **opts)),
                                 run(engine, req("s4", tokenizer(PROMPTS[0]).input_ids,
                                                 **opts)))
    assert tokens(crowd[0]) == alone
    assert tokens(crowd[1]) != alone
    greedy = tokens(await run(engine, req("g", ids, max_tokens=24, ignore_eos=True)))
    top1 = tokens(await run(engine, req("k", ids, temperature=1.5, top_k=1, max_tokens=24,
                                        ignore_eos=True)))
    tiny_p = tokens(await run(engine, req("p", ids, temperature=1.5, top_p=1e-6,
                                          max_tokens=24, ignore_eos=True)))
    assert top1 == tiny_p == greedy


async def test_logprobs_and_stop_tokens(engine: ReferenceEngine, tokenizer: Any,
                                        expected: list[list[int]]) -> None:
    ids = tokenizer(PROMPTS[0]).input_ids
    outs = await run(engine, req("lp", ids, max_tokens=8, logprobs=3))
    toks = tokens(outs)
    lps = [lp for o in outs for lp in o.logprobs or []]
    tops = [t for o in outs for t in o.top_logprobs or []]
    assert len(lps) == len(tops) == len(toks) == 8
    for tok, lp, top in zip(toks, lps, tops, strict=True):
        assert len(top) == 3 and top[0][0] == tok and top[0][1] == pytest.approx(lp)
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        assert lp <= 0
    assert all(o.logprobs is None for o in await run(engine, req("no", ids, max_tokens=2)))
    # A stop token id ends the request on that token, which is emitted.
    stop_at = expected[0][3]
    outs = await run(engine, req("st", ids, stop_token_ids=[stop_at]))
    assert tokens(outs) == expected[0][:expected[0].index(stop_at) + 1]
    assert outs[-1].finish_reason == "stop"


async def test_kv_blocks_round_trip_between_engines(engine: ReferenceEngine,
                                                    fp32_dir: Path, model_dir: ModelDir,
                                                    tokenizer: Any) -> None:
    ids = tokenizer(PROMPTS[4] + " " + PROMPTS[2]).input_ids
    cold = tokens(await run(engine, req("src", ids, max_tokens=16)))
    hashes = sequence_hashes(ids, 16)
    blocks = await engine.export_blocks(hashes)
    assert blocks.num_blocks == len(hashes) >= 3
    assert tuple(blocks.data.shape) == (len(hashes), 30, 16, 2, 3, 64)
    other = _engine(fp32_dir, model_dir)
    await other.start()
    try:
        assert await other.import_blocks(blocks) == len(hashes)
        assert await other.import_blocks(blocks) == 0  # already held: nothing new
        again = await other.export_blocks(hashes)
        assert torch.equal(again.data, blocks.data)
        outs = await run(other, req("dst", ids, max_tokens=16))
        assert outs[0].cached_tokens == min(len(hashes), (len(ids) - 1) // 16) * 16
        assert tokens(outs) == cold
        wrong = dataclasses.replace(blocks, layout=msgspec.structs.replace(blocks.layout,
                                                                       block_size=32))
        with pytest.raises(ValueError, match="layout"):
            await other.import_blocks(wrong)
    finally:
        await other.stop()


def test_blocks_copied_in_lands_where_asked_in_any_order(engine: ReferenceEngine) -> None:
    """Onboarding copies host slots into pool blocks run by run, shared out to threads
    when there are many runs: every block must land whole in its own pool block."""
    import random

    rng = random.Random(5)
    src = torch.randn((96, 30, 16, 2, 3, 64))
    for n, block_ids, rows in (
            (40, list(range(10, 50)), list(range(30, 70))),           # one run
            (64, rng.sample(range(engine.num_blocks), 64), rng.sample(range(96), 64)),
            (48, [b for r in range(0, 48, 6) for b in range(100 + 2 * r, 106 + 2 * r)],
             list(range(48)))):                                      # 8 runs of 6
        engine._scatter(block_ids, src, rows)
        assert torch.equal(engine._read_blocks(block_ids), src[rows]), n


ON_CUDA = [pytest.mark.gpu,
           pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize(("dtype", "offload", "device"), [
    ("float32", "evict", "cpu"), ("bfloat16", "evict", "cpu"),
    ("float32", "write-through", "cpu"),
    # Page-locked host tier, copies between it and the device pool.
    pytest.param("float32", "evict", "cuda", marks=ON_CUDA),
    pytest.param("bfloat16", "write-through", "cuda", marks=ON_CUDA)])
async def test_a_prefix_from_the_host_tier_gives_the_cold_output(
        dtype: str, offload: str, device: str, fp32_dir: Path, model_dir: ModelDir,
        tokenizer: Any, expected: list[list[int]]) -> None:
    path = fp32_dir if dtype == "float32" else model_dir.path
    eng = ReferenceEngine(dataclasses.replace(model_dir, path=path), dtype=dtype,
                          device=device, threads=2, num_blocks=9,
                          max_num_batched_tokens=BUDGET, host_gib=0.1, kv_offload=offload)
    await eng.start()
    try:
        ids = tokenizer(PROMPTS[4]).input_ids
        cold = tokens(await run(eng, req("cold", ids)))
        prefix = sequence_hashes(ids, 16)[:(len(ids) - 1) // 16]
        others = {i: tokenizer(PROMPTS[i] * 2).input_ids for i in (0, 1, 2, 3)}
        first = {}
        for i, other in others.items():  # other answers push the prefix out of the pool
            first[i] = tokens(await run(eng, req(f"other{i}", other)))
        assert eng.pool.lookup(prefix) == []  # none of it in the pool any more
        host = eng.host
        assert host is not None and all(eng.pool.holds(h) or h in host for h in prefix)
        warm = await run(eng, req("warm", ids))
        assert warm[0].cached_tokens == len(prefix) * 16 > 0
        assert host.onboarded > 0
        assert tokens(warm) == cold
        # The blocks the onboarding reused were saved intact: the prompts they held
        # come back from the host tier (or the pool) with their first answers.
        for i, other in others.items():
            assert tokens(await run(eng, req(f"again{i}", other))) == first[i]
        if dtype == "float32" and device == "cpu":
            assert cold == expected[4]
    finally:
        await eng.stop()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
async def test_a_prefix_pulled_from_another_engine_gives_the_cold_output(
        dtype: str, fp32_dir: Path, model_dir: ModelDir, tokenizer: Any,
        ucx_loopback: None) -> None:
    """Engine B reads the KV engine A computed for a prompt out of A's host tier over
    NIXL (UCX, loopback shared memory), by a descriptor, and answers the prompt from
    it: token for token what A computed cold."""
    model = dataclasses.replace(model_dir, path=fp32_dir if dtype == "float32" else model_dir.path)
    a, b = (ReferenceEngine(model, dtype=dtype, device="cpu", threads=2, num_blocks=32,
                            max_num_batched_tokens=BUDGET, host_gib=0.1, kv_offload=offload)
            for offload in ("write-through", "evict"))
    await a.start()
    await b.start()
    try:
        ids = tokenizer(PROMPTS[4] + " " + PROMPTS[2]).input_ids
        cold = tokens(await run(a, req("cold", ids)))
        hashes = sequence_hashes(ids, 16)[:(len(ids) - 1) // 16]
        await a.open_transfers("engine-a")
        await b.open_transfers("engine-b")
        held, addrs = a.lend_host_blocks(hashes)
        assert held == hashes and len(held) >= 3
        descriptor = KVDescriptor(
            request_id="cold", agent="engine-a", hashes=pack_hashes(held), addrs=addrs,
            block_bytes=a.host.block_bytes, kv=a.kv_digest, lease="cold.1",
            lease_expires=time.time() + 30)
        assert await b.pull_host_blocks(descriptor, a.transfer_metadata()) == len(held)
        a.return_host_blocks(held)
        warm = await run(b, req("warm", ids))
        assert warm[0].cached_tokens == len(held) * 16
        assert tokens(warm) == cold
    finally:
        await a.stop()
        await b.stop()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
async def test_a_prefix_from_the_disk_tier_gives_the_cold_output(
        dtype: str, fp32_dir: Path, model_dir: ModelDir, tokenizer: Any,
        expected: list[list[int]], tmp_path: Path) -> None:
    pytest.importorskip("nixl_cu12")
    model = dataclasses.replace(model_dir, path=fp32_dir if dtype == "float32" else model_dir.path)
    block = ReferenceEngine(model, dtype=dtype, device="cpu").kv_bytes_per_token * 16

    def make() -> ReferenceEngine:  # G1 9 blocks, G2 4, G3 on disk, every block admitted
        return ReferenceEngine(model, dtype=dtype, device="cpu", threads=2, num_blocks=9,
                               max_num_batched_tokens=BUDGET, host_gib=4 * block / 2**30,
                               disk_gib=256 * (block + 8192) / 2**30, disk_dir=str(tmp_path),
                               disk_admit_after=1)

    ids = tokenizer(PROMPTS[4]).input_ids
    prefix = sequence_hashes(ids, 16)[:(len(ids) - 1) // 16]
    others = {i: tokenizer(PROMPTS[i] * 2).input_ids for i in (0, 1, 2, 3)}

    async def push_out(eng: ReferenceEngine) -> None:
        """Other answers push the prefix out of the pool and the host tier."""
        for i, other in others.items():
            await run(eng, req(f"other{i}-{len(tmp_path.name)}", other))
        assert eng.disk is not None and eng.host is not None
        await eng.disk.flush()
        assert eng.pool.lookup(prefix) == [] and eng.host.prefix(prefix) == 0

    eng = make()
    await eng.start()
    try:
        cold = tokens(await run(eng, req("cold", ids)))
        await push_out(eng)
        disk = eng.disk
        assert disk is not None and disk.prefix(prefix) == len(prefix) > 0
        changes = eng.residency_changes()
        assert {changes[h] for h in prefix} == {"disk"}  # moved down a tier, not gone
        warm = await run(eng, req("warm", ids))
        assert warm[0].cached_tokens == len(prefix) * 16 and disk.onboarded >= len(prefix)
        assert tokens(warm) == cold
    finally:
        await eng.stop()

    eng = make()  # a restart with the same directory finds the blocks again
    await eng.start()
    try:
        disk = eng.disk
        assert disk is not None and disk.prefix(prefix) == len(prefix)
        changes = eng.residency_changes()
        assert {changes[h] for h in prefix} == {"disk"}  # and republishes them
        warm = await run(eng, req("restarted", ids))
        assert warm[0].cached_tokens == len(prefix) * 16
        assert tokens(warm) == cold
        files = disk.files
        assert files is not None and files.directory is not None
        index, i = divmod(disk.slot(prefix[0]), files.slots_per_file)
        path = next(files.directory.glob(f"kv-*-{index:04d}.blocks"))
        where = i * files.slot_bytes + HEADER_BYTES + 1000
    finally:
        await eng.stop()

    fd = os.open(path, os.O_RDWR)  # one bit of the prefix's first block flips on disk
    try:
        os.pwrite(fd, bytes([os.pread(fd, 1, where)[0] ^ 1]), where)
    finally:
        os.close(fd)
    eng = make()
    await eng.start()
    try:
        disk = eng.disk
        assert disk is not None and disk.prefix(prefix) == len(prefix)  # the header is fine
        again = await run(eng, req("corrupt", ids))
        assert tokens(again) == cold  # the bad block was computed, never read
        assert disk.corrupt == 1 and prefix[0] not in disk
    finally:
        await eng.stop()
    if dtype == "float32":
        assert cold == expected[4]
