"""The reference engine: a Llama-family model in PyTorch on CPU or CUDA, run by the shared
continuous-batching scheduler (:mod:`dynamo_bus.engines.scheduler`).

Each step the scheduler's prefill chunks and decode tokens become one flat
:class:`~dynamo_bus.engines.reference.batch.ForwardBatch`; the forward and the sampling
run on one dedicated thread (PyTorch releases the GIL inside its kernels, so the worker's
event loop keeps streaming tokens meanwhile). The KV cache is paged in the block pool's
blocks, so prefix caching, preemption and whole-block KV export/import work on the same
block ids the scheduler hands out. On CUDA, pure decode steps replay captured CUDA graphs
(:mod:`dynamo_bus.engines.reference.graphs`) unless ``cuda_graphs`` is off.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from dynamo_bus.engines.base import EngineRequest, KVLayout
from dynamo_bus.engines.reference.batch import ForwardBatch, KVCache
from dynamo_bus.engines.reference.graphs import DecodeGraphs, DecodeRunner
from dynamo_bus.engines.reference.model import CausalLM, ModelConfig
from dynamo_bus.engines.reference.packed import PackedLinear, cpu_has_native_bf16
from dynamo_bus.engines.reference.sampler import make_generator, sample
from dynamo_bus.engines.scheduler import BatchingEngine
from dynamo_bus.engines.sequence import Sampled, Seq
from dynamo_bus.kvbm.files import blocks_in
from dynamo_bus.models.modeldir import ModelDir
from dynamo_bus.models.weights import ensure_weights

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_KV_CACHE_GIB = 1.0


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but PyTorch sees no CUDA device")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> str:
    """``auto``: bfloat16 on CUDA and on CPUs with native bfloat16 matmuls, else float32."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, not {dtype!r}")
        return dtype
    if device.type == "cuda":
        return "bfloat16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


class ReferenceEngine(BatchingEngine):
    """See the module docstring. Built by the engine registry as ``--engine reference``."""

    name = "reference"

    def __init__(self, model_dir: ModelDir, *, served_name: str | None = None,
                 dtype: str = "auto", device: str = "auto", threads: int = 0,
                 block_size: int = 16, num_blocks: int = 0,
                 kv_cache_gib: float = DEFAULT_KV_CACHE_GIB, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 1024, seed: int | None = None,
                 cuda_graphs: bool = True, host_gib: float = 0.0,
                 kv_policy: str = "lru", kv_offload: str = "evict", disk_gib: float = 0.0,
                 disk_dir: str = "", disk_admit_after: int = 2) -> None:
        self.device = pick_device(device)
        self.dtype_name = pick_dtype(dtype, self.device)
        self.dtype = DTYPES[self.dtype_name]
        self.model_dir = model_dir
        self.threads = threads or len(os.sched_getaffinity(0))
        self.config = cfg = ModelConfig.from_dict(
            json.loads((model_dir.path / "config.json").read_text("utf-8")))
        per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * self.dtype.itemsize
        if num_blocks <= 0:
            num_blocks = max(1, int(kv_cache_gib * 2**30) // (per_token * block_size))
        self.kv_bytes_per_token = per_token
        super().__init__(served_name or model_dir.name, vocab_size=cfg.vocab_size,
                         eos_token_ids=model_dir.eos_token_ids,
                         context_length=model_dir.context_length, block_size=block_size,
                         num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                         max_num_batched_tokens=max_num_batched_tokens,
                         host_blocks=int(host_gib * 2**30) // (per_token * block_size),
                         kv_policy=kv_policy, kv_offload=kv_offload,
                         disk_blocks=blocks_in(disk_gib, per_token * block_size),
                         disk_dir=disk_dir, disk_admit_after=disk_admit_after)
        self._seed = seed
        self._use_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: DecodeRunner | None = None
        self._model: CausalLM | None = None
        self._kv: KVCache | None = None
        self._shared_gen: torch.Generator | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._copiers: ThreadPoolExecutor | None = None  # KV block copies on CPU

    # -- lifecycle hooks --------------------------------------------------------------

    async def _load(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reference-engine")
        started = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load_sync)
        log.info("reference engine: %s loaded in %.1f s (%s on %s, %s, %d KV blocks "
                 "of %d tokens = %.2f GiB)", self.model, time.monotonic() - started,
                 self.dtype_name, self.device,
                 f"{self.threads} threads" if self.device.type == "cpu" else
                 "CUDA graphs for decode" if self._use_graphs else "eager",
                 self.num_blocks, self.block_size,
                 self.num_blocks * self.block_size * self.kv_bytes_per_token / 2**30)

    def _load_sync(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads)
        ensure_weights(self.model_dir, self.dtype_name, progress=True)
        self._model = CausalLM.from_dir(self.model_dir.path, self.dtype, self.device)
        self._model.pack_linears()
        plan = PackedLinear.plan(self.dtype, self.device)
        if plan is not None and plan[0] != self.dtype:
            log.info("reference engine: this CPU has no native %s matmuls; they run widened "
                     "to %s", self.dtype_name, str(plan[0]).removeprefix("torch."))
        # One block more than the pool hands out: the scratch block padded graph rows
        # write to.
        self._kv = KVCache.allocate(self._model.config, self.num_blocks + 1, self.block_size,
                                    self.dtype, self.device)
        if self._use_graphs:
            self._graphs = DecodeGraphs(
                self._model, self._kv, scratch_block=self.num_blocks,
                max_batch=self.max_num_seqs,
                max_blocks=-(-self.context_length // self.block_size), capture=True)
        self._shared_gen = torch.Generator(device=self.device)
        if self._seed is not None:
            self._shared_gen.manual_seed(self._seed)
        else:
            self._shared_gen.seed()
        # Warm up both attention paths so the first request pays no one-time setup; the
        # blocks written here hold no hash, so nothing will ever read them as a prefix.
        table = list(range(min(2, self.num_blocks)))
        n = min(len(table) * self.block_size - 1, 8)
        self._model(ForwardBatch.build([(list(range(1, n + 1)), 0, table)], self.block_size,
                                       self.device), self._kv)
        self._model(ForwardBatch.build([([1], n, table)], self.block_size, self.device), self._kv)

    @property
    def num_decode_graphs(self) -> int:
        """CUDA graphs recorded so far (0 on CPU, with graphs off, or after they failed)."""
        return 0 if self._graphs is None else self._graphs.num_graphs

    async def _unload(self) -> None:
        for executor in (self._executor, self._copiers):
            if executor is not None:
                await asyncio.to_thread(executor.shutdown, True)
        self._executor = self._copiers = None
        self._model = self._kv = self._graphs = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _prepare(self, seq: Seq, request: EngineRequest) -> None:
        seq.state = make_generator(request.sampling.seed, self.device)

    # -- a step -----------------------------------------------------------------------

    async def _execute(self, prefills: list[tuple[Seq, int]],
                       decodes: list[Seq]) -> list[Sampled | None]:
        table = self.pool.block_table
        loop = asyncio.get_running_loop()
        if not prefills and self._graphs is not None:
            tokens = await self._graph_step(decodes)
            if tokens is not None:
                return list(tokens)
        # Read the block tables now, before the first await (see BatchingEngine).
        entries: list[tuple[list[int], int, list[int]]] = []
        want: list[bool] = []
        for seq, n in prefills:
            start = seq.num_computed
            entries.append((seq.tokens[start:start + n], start, table(seq.request_id)))
            want.append(start + n == seq.prefill_target)
        for seq in decodes:
            entries.append((seq.tokens[-1:], seq.num_computed, table(seq.request_id)))
            want.append(True)
        batch = ForwardBatch.build(entries, self.block_size, self.device, want)
        sampled_seqs = [s for (s, _), w in zip(prefills, want, strict=False) if w] + decodes
        options = [s.sampling for s in sampled_seqs]
        gens = [s.state for s in sampled_seqs]
        tokens = await loop.run_in_executor(self._executor, self._step, batch, options, gens)
        it = iter(tokens)
        return [next(it) if w else None for w in want]

    async def _graph_step(self, decodes: list[Seq]) -> list[Sampled] | None:
        """A pure decode step from a CUDA graph; None when it does not fit one, for the
        eager path to run it."""
        graphs, bs = self._graphs, self.block_size
        assert graphs is not None
        need = max(seq.num_computed // bs + 1 for seq in decodes)
        if not graphs.fits(len(decodes), need):
            return None
        # The block tables are read now, before the first await (see BatchingEngine).
        rows = [(seq.tokens[-1], seq.num_computed,
                 self.pool.block_table(seq.request_id)[:seq.num_computed // bs + 1])
                for seq in decodes]
        options = [s.sampling for s in decodes]
        gens = [s.state for s in decodes]

        def step() -> list[Sampled]:
            with torch.inference_mode():
                return sample(graphs.run(rows), options, gens, self._shared_gen)

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, step)
        except RuntimeError:
            # A step that cannot be captured is a bug to report, not a reason to stop
            # serving: this step and all later ones run eagerly, from the same rows.
            log.exception("reference engine: CUDA graph decode failed; decoding eagerly "
                          "from now on")
            self._graphs = None
        batch = ForwardBatch.build([([tok], pos, tb) for tok, pos, tb in rows], bs, self.device)
        return await loop.run_in_executor(self._executor, self._step, batch, options, gens)

    def _step(self, batch: ForwardBatch, options: list[Any], gens: list[Any]) -> list[Sampled]:
        model, kv = self._model, self._kv
        if model is None or kv is None:
            raise RuntimeError("the reference engine is not loaded")
        with torch.inference_mode():
            logits = model(batch, kv)
            if not options:
                return []
            return sample(logits, options, gens, self._shared_gen)

    # -- KV blocks in and out ---------------------------------------------------------

    def _host_block_shape(self) -> tuple[tuple[int, ...], Any]:
        cfg = self.config
        return (cfg.num_layers, self.block_size, 2, cfg.num_kv_heads, cfg.head_dim), self.dtype

    def _pin_host(self) -> bool:
        return self.device.type == "cuda"  # page-locked, as DMA and NIXL need it

    def _kv_layout(self) -> KVLayout:
        cfg = self.config
        return KVLayout(num_layers=cfg.num_layers, block_size=self.block_size,
                        num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                        dtype=self.dtype_name)

    def _read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        return self._cache().blocks.index_select(0, ids)  # already the export layout

    def _write_blocks(self, block_ids: list[int], data: Any) -> None:
        data = torch.as_tensor(data)
        if data.dtype != self.dtype:
            data = data.to(self.dtype)
        self._scatter(block_ids, data, list(range(len(block_ids))))

    async def _onboard_blocks(self, block_ids: list[int], slots: list[int]) -> None:
        host = self.host
        assert host is not None
        await asyncio.to_thread(self._scatter, block_ids, host.data, slots)

    def _scatter(self, block_ids: list[int], src: torch.Tensor, rows: list[int]) -> None:
        """Copy blocks ``src[rows[j]]`` (export layout, any device) into the pool's
        ``block_ids[j]``: the pool holds blocks in the same layout, so each run of block
        ids and rows that both go on is one contiguous copy. On CPU, many runs are shared
        out to one thread per core: copies issued one after another reached about 70 % of
        a plain copy's bandwidth here, side by side about 90 % (bench/kvbm_tiers.py)."""
        pool = self._cache().blocks
        runs: list[tuple[int, int, int]] = []  # (first block id, first row, length)
        for b, r in zip(block_ids, rows, strict=True):
            if runs and runs[-1][0] + runs[-1][2] == b and runs[-1][1] + runs[-1][2] == r:
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((b, r, 1))

        def copy(part: list[tuple[int, int, int]]) -> None:
            for b, r, n in part:
                pool[b:b + n].copy_(src[r:r + n])

        ways = min(self.threads, len(runs) // 4) if self.device.type == "cpu" else 1
        if ways < 2:
            copy(runs)
            return
        if self._copiers is None:
            self._copiers = ThreadPoolExecutor(self.threads, thread_name_prefix="kv-copy")
        runs.sort(key=lambda run: -run[2])  # longest first, dealt round the threads
        for done in [self._copiers.submit(copy, runs[i::ways]) for i in range(ways)]:
            done.result()

    def _cache(self) -> KVCache:
        if self._kv is None:
            raise RuntimeError("the reference engine is not started")
        return self._kv

