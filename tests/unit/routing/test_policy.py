"""The routing policy and the residency index it reads: which worker a request gets."""

from __future__ import annotations

import pytest

from dynamo_bus.bus.messages import (
    Fingerprint,
    KvRouterOverride,
    Load,
    Registration,
    Request,
    RoutingHints,
)
from dynamo_bus.hashing import HASH_SCHEME, sequence_hashes
from dynamo_bus.routing.kv_index import ResidencyIndex
from dynamo_bus.routing.policy import AllBusy, NoEligibleWorker, RoutingPolicy

BS = 16


class FakeWorkerView:
    """A fake of the registry (``WorkerView``): fixed workers, settable loads."""

    def __init__(self, *ids: str) -> None:
        self.regs = [self.reg(w) for w in ids]
        self.loads: dict[str, Load] = {}

    @staticmethod
    def reg(wid: str, *, block_size: int = BS, tokenizer: str = "tok", started: float = 1.0,
            scheme: str = HASH_SCHEME) -> Registration:
        return Registration(worker_id=wid, model="m", work_subject=f"w.{wid}", capacity=8,
                            fingerprint=Fingerprint("m", block_size, scheme, tokenizer),
                            started_at=started)

    def workers(self, model: str | None = None) -> list[Registration]:
        return self.regs

    def load(self, worker_id: str) -> Load | None:
        return self.loads.get(worker_id)


def request(tokens: list[int], rid: str = "r1", **routing: object) -> Request:
    return Request(request_id=rid, model="m", token_ids=tokens, reply_to="",
                   routing=RoutingHints(**routing))  # type: ignore[arg-type]


def hold(index: ResidencyIndex, wid: str, tokens: list[int], tier: str = "device") -> None:
    for h in sequence_hashes(tokens, BS):
        index.apply(wid, h, tier)


PROMPT = list(range(1000, 1000 + 20 * BS))  # 20 full blocks


def test_index_counts_the_cached_prefix_per_tier_and_stops_at_a_gap() -> None:
    index = ResidencyIndex()
    hashes = sequence_hashes(PROMPT, BS)
    hold(index, "a", PROMPT[:10 * BS])
    hold(index, "b", PROMPT[:4 * BS], "host")
    for h in hashes[6:]:  # b holds later blocks too, but not block 4 and 5
        index.apply("b", h, "disk")
    index.apply("a", hashes[2], "host")  # a's block 2 moved to host
    got = index.overlaps(hashes, ["a", "b", "c"])
    assert got == {"a": (9, 1, 0), "b": (0, 4, 0), "c": (0, 0, 0)}
    assert index.blocks_of("a") == 10 and index.blocks_of("b") == 18
    index.apply("a", hashes[0], None)
    assert index.overlaps(hashes, ["a"])["a"] == (0, 0, 0)


def test_a_newer_incarnation_replaces_what_the_older_held() -> None:
    index = ResidencyIndex()
    hashes = sequence_hashes(PROMPT, BS)
    for h in hashes[:5]:
        index.apply("a", h, "device", instance=1)
    index.apply("a", hashes[0], "device", instance=2)  # restarted: holds only block 0
    index.apply("a", hashes[1], "device", instance=1)  # stale news from the old one
    assert index.overlaps(hashes, ["a"])["a"] == (1, 0, 0)
    assert index.blocks_of("a") == 1
    index.remove_worker("a")
    assert index.num_blocks == 0


def test_batches_and_snapshots_give_the_index_that_single_updates_give() -> None:
    hashes = sequence_hashes(PROMPT, BS)
    one = ResidencyIndex()
    for h in hashes[:10]:
        one.apply("a", h, "device", instance=1)
    one.apply("b", hashes[0], "host", instance=1)
    for h in hashes[3:5]:
        one.apply("a", h, None, instance=1)
    one.apply("a", hashes[5], "disk", instance=1)
    bulk = ResidencyIndex()
    bulk.load_worker("b", 1, [hashes[0]], [1])
    bulk.load_worker("a", 1, hashes[:10], [0] * 10)  # shares block 0 with b
    bulk.apply_batch("a", 1, [hashes[5]], [2], hashes[3:5])
    for idx in (one, bulk):
        assert idx.overlaps(hashes, ["a", "b"]) == {"a": (3, 0, 0), "b": (0, 1, 0)}
        assert idx.blocks_of("a") == 8 and idx.blocks_of("b") == 1
    assert bulk.overlaps(hashes[5:6], ["a"])["a"] == (0, 0, 1)
    assert not bulk.apply_batch("a", 0, [], [], [])  # no incarnation older than known
    bulk.load_worker("a", 2, [hashes[9]], [0])  # restarted: holds one block, shares none
    assert bulk.blocks_of("a") == 1 and bulk.blocks_of("b") == 1
    assert bulk.overlaps(hashes, ["b"])["b"] == (0, 1, 0)


def test_kv_aware_goes_where_the_prefix_is_cached() -> None:
    view = FakeWorkerView("a", "b", "c")
    policy = RoutingPolicy(view, "kv_aware", block_size=BS)
    hold(policy.index, "b", PROMPT[:12 * BS])
    req = request(PROMPT)
    decision = policy.pick(req, policy.candidates(req))
    assert decision.worker.worker_id == "b" and decision.overlap_blocks == 12
    # cost = prefill (20 - 12 credit) + decode (20 blocks - 12 held) = 16 on b, 40 elsewhere
    assert decision.costs == {"a": 40.0, "b": 16.0, "c": 40.0}


def test_load_outweighs_a_small_overlap() -> None:
    view = FakeWorkerView("a", "b")
    policy = RoutingPolicy(view, "kv_aware", block_size=BS)
    hold(policy.index, "b", PROMPT[:2 * BS])
    view.loads["b"] = Load(worker_id="b", active_prefill_tokens=100 * BS, active_blocks=50,
                           total_blocks=1000, at=1.0)
    req = request(PROMPT)
    assert policy.pick(req, policy.candidates(req)).worker.worker_id == "a"
    # ... unless the request weighs the prefill term down to nothing
    req = request(PROMPT, kv=KvRouterOverride(overlap_weight=0.0))
    assert policy.pick(req, policy.candidates(req)).worker.worker_id == "a"
    req = request(PROMPT, kv=KvRouterOverride(overlap_weight=0.0))
    view.loads["b"] = Load(worker_id="b", active_prefill_tokens=100 * BS, at=2.0)
    assert policy.pick(req, policy.candidates(req)).worker.worker_id == "b"


def test_what_a_router_sent_counts_until_the_next_load_report() -> None:
    view = FakeWorkerView("a", "b")
    policy = RoutingPolicy(view, "kv_aware", block_size=BS)
    picks = []
    for i in range(4):
        req = request(PROMPT, rid=f"r{i}")
        decision = policy.pick(req, policy.candidates(req))
        policy.sent(req, decision)
        picks.append(decision.worker.worker_id)
    assert sorted(picks) == ["a", "a", "b", "b"]  # alternates: a burst is spread


def test_ties_are_broken_the_same_way_by_every_replica() -> None:
    picks = set()
    for _ in range(3):
        view = FakeWorkerView("a", "b", "c", "d")
        policy = RoutingPolicy(view, "kv_aware", block_size=BS)
        req = request(PROMPT, rid="same-id")
        picks.add(policy.pick(req, policy.candidates(req)).worker.worker_id)
    assert len(picks) == 1
    view = FakeWorkerView("a", "b", "c", "d")
    policy = RoutingPolicy(view, "kv_aware", block_size=BS)
    spread = {policy.pick(r, policy.candidates(r)).worker.worker_id
              for r in (request(PROMPT, rid=f"id{i}") for i in range(40))}
    assert spread == {"a", "b", "c", "d"}


def test_temperature_spreads_choices_by_cost() -> None:
    view = FakeWorkerView("a", "b")
    policy = RoutingPolicy(view, "kv_aware", block_size=BS)
    hold(policy.index, "b", PROMPT[:19 * BS])
    hot = [policy.pick(r, policy.candidates(r)).worker.worker_id
           for r in (request(PROMPT, rid=f"t{i}", kv=KvRouterOverride(temperature=1.0))
                     for i in range(200))]
    assert 0 < hot.count("a") < hot.count("b")
    cold = {policy.pick(r, policy.candidates(r)).worker.worker_id
            for r in (request(PROMPT, rid=f"t{i}") for i in range(50))}
    assert cold == {"b"}


def test_a_mismatched_fingerprint_is_refused_with_the_reason() -> None:
    view = FakeWorkerView("a")
    view.regs += [view.reg("big", block_size=32), view.reg("other", tokenizer="xyz", started=2),
                  view.reg("old", scheme="md5")]
    policy = RoutingPolicy(view, "round_robin", block_size=BS)
    req = request(PROMPT)
    assert [w.worker_id for w in policy.candidates(req)] == ["a"]
    assert "another tokenizer" in policy._refused["other"]
    view.regs = [view.reg("big", block_size=32), view.reg("old", scheme="md5")]
    with pytest.raises(NoEligibleWorker) as err:
        policy.candidates(req)
    assert "blocks of 32 tokens" in str(err.value) and "md5" in str(err.value)


def test_busy_workers_are_skipped_and_all_busy_is_an_error() -> None:
    view = FakeWorkerView("a", "b")
    policy = RoutingPolicy(view, "round_robin", block_size=BS, busy_kv=0.9)
    view.loads["a"] = Load(worker_id="a", active_blocks=95, total_blocks=100, at=1.0)
    reqs = [request(PROMPT, rid=f"r{i}") for i in range(4)]
    assert {policy.pick(r, policy.candidates(r)).worker.worker_id for r in reqs} == {"b"}
    view.loads["b"] = Load(worker_id="b", active_blocks=90, total_blocks=100, at=1.0)
    with pytest.raises(AllBusy):
        policy.pick(reqs[0], policy.candidates(reqs[0]))
    # a direct request is not subject to the thresholds
    direct = request(PROMPT, worker_id="a")
    assert policy.pick(direct, policy.candidates(direct)).worker.worker_id == "a"


# -- disaggregated: which worker decodes, and whether a prefill worker computes first --

def _disagg_view() -> FakeWorkerView:
    view = FakeWorkerView()
    for wid, role in (("a", "aggregated"), ("d1", "decode"), ("d2", "decode"),
                      ("p1", "prefill"), ("p2", "prefill")):
        reg = view.reg(wid)
        reg.role = role  # type: ignore[assignment]
        view.regs.append(reg)
    return view


def test_a_prefill_worker_never_decodes_and_a_long_uncached_prompt_goes_to_one() -> None:
    view = _disagg_view()
    view.regs = [r for r in view.regs if r.worker_id != "a"]
    index = ResidencyIndex()
    policy = RoutingPolicy(view, "kv_aware", block_size=BS, index=index)
    hold(index, "p2", PROMPT[:6 * BS])
    d = policy.place(request(PROMPT), view.workers(), min_prefill_tokens=100)
    assert d.worker.role == "decode"
    # The prefill side is chosen by its cached prefix, like any KV-aware choice.
    assert d.prefill is not None and d.prefill.worker.worker_id == "p2"
    assert d.prefill.overlap_blocks == 6


def test_a_prompt_mostly_cached_on_the_decode_worker_is_prefilled_there() -> None:
    view = _disagg_view()
    view.regs = [r for r in view.regs if r.worker_id != "a"]
    index = ResidencyIndex()
    policy = RoutingPolicy(view, "kv_aware", block_size=BS, index=index)
    hold(index, "d2", PROMPT[:16 * BS], "host")  # 4 blocks (64 tokens) left to compute
    d = policy.place(request(PROMPT), view.workers(), min_prefill_tokens=100)
    assert (d.worker.worker_id, d.prefill) == ("d2", None)
    # At the threshold it goes remote: Dynamo's rule with ">= min" for "> max local".
    d = policy.place(request(PROMPT, "r2"), view.workers(), min_prefill_tokens=64)
    assert d.worker.worker_id == "d2" and d.prefill is not None


def test_disaggregation_follows_the_decode_choice_and_busy_prefill_workers() -> None:
    view = _disagg_view()
    policy = RoutingPolicy(view, "kv_aware", block_size=BS, busy_prefill_tokens=500)
    # An aggregated worker chosen to decode runs all of it.
    d = policy.place(request(PROMPT, worker_id="a"), view.workers(), min_prefill_tokens=0)
    assert (d.worker.worker_id, d.prefill) == ("a", None)
    # Named decode worker: a prefill worker is still chosen by cost, not by the name.
    d = policy.place(request(PROMPT, worker_id="d1"), view.workers(), min_prefill_tokens=0)
    assert d.worker.worker_id == "d1" and d.prefill is not None
    # Every prefill worker busy: the decode worker prefills it itself.
    for p in ("p1", "p2"):
        view.loads[p] = Load(worker_id=p, active_prefill_tokens=600, at=1.0)
    d = policy.place(request(PROMPT, worker_id="d1"), view.workers(), min_prefill_tokens=0)
    assert (d.worker.worker_id, d.prefill) == ("d1", None)


def test_prefill_workers_alone_cannot_serve() -> None:
    view = _disagg_view()
    view.regs = [r for r in view.regs if r.role == "prefill"]
    policy = RoutingPolicy(view, "kv_aware", block_size=BS)
    with pytest.raises(NoEligibleWorker, match="no decode or aggregated worker"):
        policy.place(request(PROMPT), view.workers())


def test_sent_counts_prefill_on_the_prefill_worker_and_blocks_on_the_decoder() -> None:
    view = _disagg_view()
    view.regs = [r for r in view.regs if r.worker_id in ("d1", "p1")]
    policy = RoutingPolicy(view, "kv_aware", block_size=BS, busy_prefill_tokens=300)
    d = policy.place(request(PROMPT), view.workers(), min_prefill_tokens=0)
    policy.sent(request(PROMPT), d)
    # d1 is not busy with prefill (p1 computes the prompt); p1 now is.
    assert not policy.busy(view.regs[0]) and policy.busy(view.regs[1])
