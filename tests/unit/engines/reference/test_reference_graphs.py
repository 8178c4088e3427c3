"""Graph-replayed decode steps (dynamo_bus.engines.reference.graphs): bucketing, padding
rows and the scratch block give the eager step's logits and touch no sequence's KV. On
CPU the same code runs uncaptured; the ``gpu`` tests capture real CUDA graphs."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from dynamo_bus.engines.reference.batch import ForwardBatch, KVCache  # noqa: E402
from dynamo_bus.engines.reference.graphs import (  # noqa: E402
    DecodeGraphs,
    batch_buckets,
    width_buckets,
)
from dynamo_bus.engines.reference.model import CausalLM  # noqa: E402

BLOCK = 16
PROMPTS = [list(range(300, 305)), list(range(400, 431)), list(range(500, 547))]  # 5, 31, 47


def test_buckets() -> None:
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(1) == [1]
    assert width_buckets(512) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert width_buckets(5) == [1, 2, 4, 5]
    assert width_buckets(1) == [1]


def _decode_against_eager(model: CausalLM, dtype: Any, device: str, capture: bool,
                          steps: int = 20) -> DecodeGraphs:
    """Prefill three prompts into two identical caches, then decode them greedily, one
    cache through DecodeGraphs and one eagerly; every step's logits and every real block
    agree. Sequence 1 starts at 31 tokens, so it crosses into a new block and the width
    bucket grows; sequence 0 stops early, so the batch bucket shrinks."""
    scratch = 24
    caches = [KVCache.allocate(model.config, scratch + 1, BLOCK, dtype, device)
              for _ in range(2)]
    tables = [list(range(8 * i, 8 * i + 8)) for i in range(3)]
    prefill = ForwardBatch.build([(p, 0, t) for p, t in zip(PROMPTS, tables, strict=True)],
                                 BLOCK, device)
    with torch.inference_mode():
        for kv in caches:
            first = model(prefill, kv)
        graphs = DecodeGraphs(model, caches[0], scratch_block=scratch, max_batch=4,
                              max_blocks=8, capture=capture)
        tokens = first.argmax(-1).tolist()
        lengths = [len(p) for p in PROMPTS]
        live = [0, 1, 2]
        for step in range(steps):
            if step == 5:
                live = [1, 2]  # one sequence finishes
            rows = [(tokens[i], lengths[i], tables[i]) for i in live]
            got = graphs.run(rows).float()
            want = model(ForwardBatch.build([([tok], pos, t) for tok, pos, t in rows],
                                            BLOCK, device), caches[1]).float()
            tol = 1e-4 if dtype == torch.float32 else 3e-2 * float(want.abs().max())
            torch.testing.assert_close(got, want, atol=tol, rtol=0)
            for i, tok in zip(live, want.argmax(-1).tolist(), strict=True):
                tokens[i], lengths[i] = tok, lengths[i] + 1
        assert lengths[1] > 2 * BLOCK  # crossed a block boundary
        for layer_got, layer_want in zip(caches[0].layers, caches[1].layers, strict=True):
            # The scratch block is the only one the padding rows wrote to.
            torch.testing.assert_close(layer_got[:scratch].float(), layer_want[:scratch].float(),
                                       atol=1e-4 if dtype == torch.float32 else 0.05, rtol=0)
            assert not layer_want[scratch].any()
    return graphs


def test_padded_decode_matches_eager_on_cpu(fp32_dir: Path) -> None:
    torch.set_num_threads(2)
    model = CausalLM.from_dir(fp32_dir, torch.float32)
    graphs = _decode_against_eager(model, torch.float32, "cpu", capture=False)
    assert graphs.num_graphs == 0  # nothing captured on CPU


def test_a_step_that_does_not_fit_is_refused(fp32_dir: Path) -> None:
    model = CausalLM.from_dir(fp32_dir, torch.float32)
    kv = KVCache.allocate(model.config, 4, BLOCK, torch.float32)
    graphs = DecodeGraphs(model, kv, scratch_block=3, max_batch=2, max_blocks=2,
                          capture=False)
    assert graphs.fits(2, 2) and not graphs.fits(3, 1) and not graphs.fits(1, 3)
    with pytest.raises(ValueError, match="does not fit"):
        graphs.run([(1, 40, [0, 1, 2])])
    with pytest.raises(ValueError, match="scratch block"):
        DecodeGraphs(model, kv, scratch_block=4, max_batch=2, max_blocks=2, capture=False)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_replay_matches_eager(fp32_dir: Path, dtype: str) -> None:
    model = CausalLM.from_dir(fp32_dir, getattr(torch, dtype), "cuda")
    graphs = _decode_against_eager(model, getattr(torch, dtype), "cuda", capture=True)
    # batch buckets 4 and 2, width buckets 4 and 8 (sequence 2 reaches 67 tokens)
    assert graphs.num_graphs >= 3


@pytest.mark.gpu
@cuda
async def test_engine_on_cuda_decodes_the_same_with_and_without_graphs(fp32_dir: Path) -> None:
    from dynamo_bus.engines.reference.engine import ReferenceEngine
    from dynamo_bus.models.modeldir import load_model_dir

    model_dir = load_model_dir(fp32_dir)
    outputs = []
    for graphs in (False, True):
        eng = ReferenceEngine(model_dir, device="cuda", dtype="float32", cuda_graphs=graphs,
                              kv_cache_gib=0.25)
        await eng.start()
        try:
            outputs.append(await _generate_all(eng, max_tokens=48))
            assert (eng.num_decode_graphs > 0) == graphs
        finally:
            await eng.stop()
    assert outputs[0] == outputs[1]


async def _generate_all(eng: Any, max_tokens: int = 40) -> list[list[int]]:
    """The three prompts at once (their decode steps batched), greedy."""
    import asyncio

    from dynamo_bus.bus.messages import SamplingOptions
    from dynamo_bus.engines.base import EngineRequest

    sampling = SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int, prompt: list[int]) -> list[int]:
        tokens: list[int] = []
        async for out in eng.generate(EngineRequest(f"r{i}", prompt, sampling)):
            tokens += out.token_ids
        return tokens

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS))))


def _counted(run: Any, counts: list[int], rows: Any) -> Any:
    counts.append(len(rows))
    return run(rows)


class FakeFailingGraphs:
    """A fake DecodeRunner whose every step fails as a CUDA graph capture can."""

    num_graphs = 0

    def fits(self, batch: int, blocks: int) -> bool:
        return True

    def run(self, decodes: Any) -> Any:
        raise RuntimeError("operation not permitted when stream is capturing")


async def test_engine_graph_path_on_cpu_decodes_as_eager(fp32_dir: Path, caplog: Any) -> None:
    """The engine's graph path (block tables, buckets, sampling) wired to uncaptured
    DecodeGraphs on CPU, which is all a CPU can run of it, gives the eager engine's
    tokens; so does an engine whose graphs fail, decoding eagerly from then on."""
    from dynamo_bus.engines.reference.engine import ReferenceEngine
    from dynamo_bus.models.modeldir import load_model_dir

    model_dir = load_model_dir(fp32_dir)
    outputs, rows_per_step = [], []
    for wire in ("eager", "graphs", "failing"):
        eng = ReferenceEngine(model_dir, device="cpu", dtype="float32", threads=2,
                              num_blocks=64, max_num_seqs=4)
        await eng.start()
        try:
            if wire == "graphs":
                assert eng._model is not None and eng._kv is not None
                graphs = DecodeGraphs(eng._model, eng._kv, scratch_block=eng.num_blocks,
                                      max_batch=4, max_blocks=8, capture=False)
                graphs.run = functools.partial(  # type: ignore[method-assign]
                    _counted, graphs.run, rows_per_step)
                eng._graphs = graphs
            elif wire == "failing":
                eng._graphs = FakeFailingGraphs()
            outputs.append(await _generate_all(eng))
            if wire == "failing":
                assert eng._graphs is None
                assert "decoding eagerly from now on" in caplog.text
        finally:
            await eng.stop()
    assert outputs[0] == outputs[1] == outputs[2]
    assert all(len(t) == 40 for t in outputs[1])
    # Decode steps went through the graphs, all three sequences batched together.
    assert len(rows_per_step) >= 30 and max(rows_per_step) == 3
