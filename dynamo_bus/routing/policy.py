"""Routing policy: which worker gets a request. Pure decisions over the registry, the
load bucket and the residency index; no I/O, so the online router and the offline
simulator (:mod:`dynamo_bus.traces.simulate`) run exactly this code.

Strategies (``--router-mode``, or per request ``routing_strategy``):

* ``kv_aware`` (default): the lowest cost, Dynamo's tier-aware form,
  ``cost = overlap_weight * max(prefill_blocks - credit, 0) + decode_blocks`` where
  ``prefill_blocks = (active prefill tokens + prompt tokens) / block_size``,
  ``credit = 1.0 * device + 0.75 * host + 0.25 * disk`` blocks of the prompt's cached
  prefix on that worker, and ``decode_blocks`` = the worker's active KV blocks plus the
  prompt's blocks it does not hold. Ties go to the worker holding fewer cached blocks,
  then to a pseudo-random one drawn from the request id, so every replica agrees. A
  temperature > 0 samples instead, by softmax of the costs normalised to [0, 1].
* ``round_robin``, ``random``, ``least_loaded`` (active requests / capacity);
* ``direct``: the worker named by ``worker_id``.

A worker is *busy* when its active KV blocks reach ``busy_kv`` of its pool or its
queued prefill tokens reach ``busy_prefill_tokens`` (0 turns a threshold off); busy
workers are skipped, and when all are busy the router queues or refuses the request.

Loads in the bucket lag by up to a publish interval; what this router sent since a
worker's last report is added on top, so a burst does not all land on one worker.

Fingerprints: a worker is refused for its model (never chosen, reported once) when
its block size or hash scheme differs from this router's, or its tokenizer differs
from that of the model's longest-running worker: routing it would silently miss
every cached prefix.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import xxhash
from msgspec.structs import replace as replace_struct

from dynamo_bus.bus.messages import (
    ROUTING_STRATEGIES,
    KvRouterOverride,
    Load,
    Registration,
    Request,
)
from dynamo_bus.errors import ConfigError
from dynamo_bus.hashing import HASH_SCHEME, sequence_hashes
from dynamo_bus.routing.kv_index import ResidencyIndex, residency_instance

log = logging.getLogger(__name__)


class WorkerView(Protocol):
    """Live workers and their last reported load (the registry, or a simulator's)."""

    def workers(self, model: str | None = None) -> list[Registration]: ...

    def load(self, worker_id: str) -> Load | None: ...


@dataclass(frozen=True)
class KvWeights:
    overlap_weight: float = 1.0
    device_credit: float = 1.0
    host_credit: float = 0.75
    disk_credit: float = 0.25
    temperature: float = 0.0

    def merged(self, override: KvRouterOverride | None) -> KvWeights:
        if override is None:
            return self
        given = {k: v for k in ("overlap_weight", "device_credit", "host_credit",
                                "disk_credit", "temperature")
                 if (v := getattr(override, k)) is not None}
        return replace(self, **given) if given else self


@dataclass
class _Sent:
    """What this router sent a worker since the worker's last load report."""

    at: float = -1.0  # the ``Load.at`` it counts from
    requests: int = 0
    prefill_tokens: int = 0
    blocks: int = 0


@dataclass
class Decision:
    worker: Registration
    cost: float = 0.0
    overlap_blocks: int = 0          # the chosen worker's cached prefix, in blocks
    costs: dict[str, float] = field(default_factory=dict)
    # Disaggregated: the prefill worker that computes the prompt for ``worker`` (a
    # decode worker); None: ``worker`` runs all of it.
    prefill: Decision | None = None


class NoEligibleWorker(LookupError):
    """Every worker is excluded or refused; the message says why."""


class AllBusy(LookupError):
    """Every eligible worker is over a busy threshold."""


class UnknownWorker(LookupError):
    """The request names (``worker_id``) a worker that does not serve its model."""


class RoutingPolicy:
    def __init__(self, view: WorkerView, default: str, *, block_size: int,
                 index: ResidencyIndex | None = None, weights: KvWeights | None = None,
                 busy_kv: float = 0.0, busy_prefill_tokens: int = 0) -> None:
        if default not in ROUTING_STRATEGIES or default == "direct":
            raise ConfigError(f"unknown routing strategy {default!r}; one of "
                              f"{', '.join(s for s in ROUTING_STRATEGIES if s != 'direct')} "
                              "(flag --router-mode, env DYNAMO_BUS_ROUTER_MODE)")
        self.view = view
        self.default = default
        self.block_size = block_size
        self.index = index if index is not None else ResidencyIndex()
        self.weights = weights or KvWeights()
        self.busy_kv = busy_kv
        self.busy_prefill_tokens = busy_prefill_tokens
        self._rr: dict[str, int] = {}
        self._sent: dict[str, _Sent] = {}
        self._refused: dict[str, str] = {}  # worker id -> why, as last reported

    # -- eligibility ------------------------------------------------------------------

    def _mismatch(self, w: Registration) -> str | None:
        fp = w.fingerprint
        if fp.block_size != self.block_size:
            return (f"worker {w.worker_id} uses KV blocks of {fp.block_size} tokens; this "
                    f"router hashes blocks of {self.block_size} (--block-size)")
        if fp.hash_scheme != HASH_SCHEME:
            return (f"worker {w.worker_id} hashes blocks with {fp.hash_scheme!r}; this "
                    f"router with {HASH_SCHEME!r}")
        return None

    def candidates(self, req: Request) -> list[Registration]:
        """Live workers of the request's model that may take it, by id. Raises
        :class:`NoEligibleWorker` when some serve it but none may take it."""
        workers = self.view.workers(req.model)
        if not workers:
            return []
        why = {w.worker_id: r for w in workers if (r := self._mismatch(w)) is not None}
        matching = [w for w in workers if w.worker_id not in why]
        if matching:  # the tokenizer of the longest-running one is the model's
            ref = min(matching, key=lambda w: (w.started_at, w.worker_id))
            for w in matching:  # "" (a worker that does not say) is not refused
                if ref.fingerprint.tokenizer and w.fingerprint.tokenizer and \
                        w.fingerprint.tokenizer != ref.fingerprint.tokenizer:
                    why[w.worker_id] = (
                        f"worker {w.worker_id} serves {w.model!r} with another tokenizer "
                        f"({w.fingerprint.tokenizer or 'unknown'}) than worker "
                        f"{ref.worker_id} ({ref.fingerprint.tokenizer or 'unknown'})")
        excluded = set(req.routing.exclude_workers)
        ok = []
        for w in workers:
            reason = why.get(w.worker_id)
            if reason is not None:
                if self._refused.get(w.worker_id) != reason:
                    log.error("refusing worker for model %s: %s", w.model, reason)
                    self._refused[w.worker_id] = reason
                continue
            self._refused.pop(w.worker_id, None)
            self.index.observe_instance(w.worker_id, residency_instance(w.started_at))
            if w.worker_id not in excluded:
                ok.append(w)
        if not ok and why:
            raise NoEligibleWorker("no worker may serve this request: "
                                   + "; ".join(why.values()))
        return sorted(ok, key=lambda w: w.worker_id)

    def _load(self, w: Registration) -> tuple[Load, _Sent]:
        load = self.view.load(w.worker_id) or Load(worker_id=w.worker_id,
                                                     capacity=w.capacity)
        sent = self._sent.get(w.worker_id)
        if sent is None or sent.at != load.at:
            sent = self._sent[w.worker_id] = _Sent(at=load.at)
        return load, sent

    def busy(self, w: Registration) -> bool:
        load, sent = self._load(w)
        if self.busy_kv > 0 and load.total_blocks and (
                load.active_blocks + sent.blocks >= self.busy_kv * load.total_blocks):
            return True
        return 0 < self.busy_prefill_tokens <= load.active_prefill_tokens + sent.prefill_tokens

    # -- the choice -------------------------------------------------------------------

    def pick(self, req: Request, workers: list[Registration],
             hashes: Sequence[int] | None = None) -> Decision:
        """Choose among ``candidates(req)``. ``hashes``: the prompt's chained block hashes
        at ``block_size`` (computed here when needed and not given). Raises LookupError
        for an unknown ``direct`` worker, :class:`AllBusy` when all are busy."""
        strategy = req.routing.strategy or self.default
        if req.routing.worker_id:
            strategy = "direct"
        if strategy == "direct":
            for w in workers:
                if w.worker_id == req.routing.worker_id:
                    return Decision(w)
            raise UnknownWorker(f"worker {req.routing.worker_id!r} is not serving {req.model}")
        free = [w for w in workers if not self.busy(w)]
        if not free:
            raise AllBusy(f"all {len(workers)} workers serving {req.model} are busy")
        rng = random.Random(xxhash.xxh3_64_intdigest(req.request_id.encode()))
        if strategy == "kv_aware":
            if hashes is None:
                hashes = sequence_hashes(req.token_ids, self.block_size)
            return self._kv_aware(req, free, hashes, rng)
        if strategy == "random":
            return Decision(rng.choice(free))
        if strategy == "least_loaded":
            return Decision(min(free, key=lambda w: (self._active_share(w), rng.random())))
        i = self._rr.get(req.model, 0)
        self._rr[req.model] = i + 1
        return Decision(free[i % len(free)])

    def place(self, req: Request, workers: list[Registration],
              hashes: Sequence[int] | None = None, *,
              min_prefill_tokens: int = 0) -> Decision:
        """:meth:`pick` among the workers that decode (aggregated and decode roles).
        When the chosen one is a decode worker, prefill workers serve the model, and
        the part of the prompt the decode worker does not hold (in any tier) is at least
        ``min_prefill_tokens`` long, a prefill worker is picked too, by the same cost
        over the prefill workers (Dynamo's rule: remote when prompt - prefix hit >
        max_local_prefill_length). With every prefill worker busy the decode worker
        prefills it."""
        serving = [w for w in workers if w.role != "prefill"]
        prefill = [w for w in workers if w.role == "prefill"]
        if not serving:
            raise NoEligibleWorker(f"{len(prefill)} prefill workers serve {req.model} but "
                                   "no decode or aggregated worker does")
        decision = self.pick(req, serving, hashes)
        if decision.worker.role != "decode" or not prefill:
            return decision
        if len(req.token_ids) - decision.overlap_blocks * self.block_size < min_prefill_tokens:
            return decision
        # The prefill side is chosen by cost whatever the request named for decoding.
        routing = replace_struct(req.routing, worker_id=None, strategy=None)
        with contextlib.suppress(AllBusy):
            decision.prefill = self.pick(replace_struct(req, routing=routing), prefill,
                                         hashes)
        return decision

    def _active_share(self, w: Registration) -> float:
        load, sent = self._load(w)
        return (load.active_requests + sent.requests) / max(w.capacity, 1)

    def _kv_aware(self, req: Request, workers: list[Registration], hashes: Sequence[int],
                  rng: random.Random) -> Decision:
        wt = self.weights.merged(req.routing.kv)
        bs = self.block_size
        isl = len(req.token_ids)
        prompt_blocks = -(-isl // bs)
        overlaps = self.index.overlaps(hashes, [w.worker_id for w in workers])
        costs: dict[str, float] = {}
        for w in workers:
            load, sent = self._load(w)
            dev, host, disk = overlaps[w.worker_id]
            credit = wt.device_credit * dev + wt.host_credit * host + wt.disk_credit * disk
            prefill = (load.active_prefill_tokens + sent.prefill_tokens + isl) / bs
            decode = load.active_blocks + sent.blocks + prompt_blocks - (dev + host + disk)
            costs[w.worker_id] = wt.overlap_weight * max(prefill - credit, 0.0) + decode
        if wt.temperature > 0 and len(workers) > 1:
            lo, hi = min(costs.values()), max(costs.values())
            span = (hi - lo) or 1.0
            probs = [math.exp(-(costs[w.worker_id] - lo) / span / wt.temperature)
                     for w in workers]
            chosen = rng.choices(workers, weights=probs)[0]
        else:
            chosen = min(workers, key=lambda w: (costs[w.worker_id],
                                                 self.index.blocks_of(w.worker_id),
                                                 rng.random()))
        dev, host, disk = overlaps[chosen.worker_id]
        return Decision(chosen, costs[chosen.worker_id], dev + host + disk, costs)

    def sent(self, req: Request, decision: Decision) -> None:
        """Count a request this router handed to ``decision.worker`` until the worker's
        next load report covers it."""
        bs = self.block_size
        _, sent = self._load(decision.worker)
        new_tokens = max(len(req.token_ids) - decision.overlap_blocks * bs, 0)
        sent.requests += 1
        sent.blocks += -(-new_tokens // bs)  # computed here, or read from the prefill
        if decision.prefill is None:
            sent.prefill_tokens += new_tokens
            return
        _, pre = self._load(decision.prefill.worker)
        new_tokens = max(len(req.token_ids) - decision.prefill.overlap_blocks * bs, 0)
        pre.requests += 1
        pre.prefill_tokens += new_tokens
        pre.blocks += -(-new_tokens // bs)

    def forget(self, worker_id: str) -> None:
        """The worker's registration lapsed. Its blocks stay in the index (a worker
        that comes back under the same incarnation publishes only changes); a newer
        incarnation replaces them, and the router drops them once it is sure the worker
        is gone (``Router._sweep``)."""
        self._sent.pop(worker_id, None)
        self._refused.pop(worker_id, None)
