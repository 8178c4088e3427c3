"""Token sampling: greedy, temperature, top-k and top-p truncation, per-request seeds and
raw-distribution logprobs, on hand-made logits."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from dynamo_bus.bus.messages import SamplingOptions  # noqa: E402
from dynamo_bus.engines.reference.sampler import make_generator, sample  # noqa: E402

# Probabilities 0.5, 0.25, 0.125, 0.0625, ... over 8 tokens (the last two share the rest).
PROBS = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.0078125])
LOGITS = PROBS.log()[None, :]


def draws(opts: SamplingOptions, n: int = 400, seed: int = 0) -> set[int]:
    gen = torch.Generator().manual_seed(seed)
    got = sample(LOGITS.repeat(n, 1), [opts] * n, [None] * n, gen)
    return {s.token for s in got}


def test_greedy_takes_the_first_maximum() -> None:
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0]])
    assert sample(logits, [SamplingOptions(temperature=0)], [None])[0].token == 1


def test_top_k_and_top_p_bound_what_can_be_drawn() -> None:
    assert draws(SamplingOptions(temperature=1.0)) >= {0, 1, 2, 3}
    assert draws(SamplingOptions(temperature=1.0, top_k=2)) == {0, 1}
    # 0.5 + 0.25 reaches 0.7: the third token is outside the nucleus.
    assert draws(SamplingOptions(temperature=1.0, top_p=0.7)) == {0, 1}
    assert draws(SamplingOptions(temperature=1.0, top_p=0.8)) == {0, 1, 2}
    assert draws(SamplingOptions(temperature=1.0, top_p=0.8, top_k=1)) == {0}


def test_low_temperature_concentrates_and_high_spreads() -> None:
    cold = sample(LOGITS.repeat(400, 1), [SamplingOptions(temperature=0.05)] * 400,
                  [None] * 400, torch.Generator().manual_seed(1))
    assert {s.token for s in cold} == {0}
    assert len(draws(SamplingOptions(temperature=5.0))) == 8


def test_a_seed_fixes_a_row_whatever_else_is_in_the_batch() -> None:
    opts = SamplingOptions(temperature=1.0, seed=123)

    def row0(batch: int) -> list[int]:
        gens = [make_generator(123, torch.device("cpu"))] + [None] * (batch - 1)
        out = []
        for _ in range(20):
            out.append(sample(LOGITS.repeat(batch, 1), [opts] * batch, gens,
                              torch.Generator().manual_seed(batch))[0].token)
        return out

    assert row0(1) == row0(5)
    assert len(set(row0(1))) > 1  # it does sample


def test_logprobs_are_the_raw_distribution() -> None:
    opts = SamplingOptions(temperature=0.3, top_k=2, logprobs=3)
    out = sample(LOGITS, [opts], [make_generator(5, torch.device("cpu"))])[0]
    assert out.logprob == pytest.approx(math.log(PROBS[out.token].item()), abs=1e-5)
    assert out.top is not None and [t for t, _ in out.top] == [0, 1, 2]
    assert [v for _, v in out.top] == pytest.approx([math.log(p) for p in (0.5, 0.25, 0.125)],
                                                   abs=1e-5)
    none = sample(LOGITS, [SamplingOptions(temperature=0, logprobs=0)], [None])[0]
    assert none.top == [] and none.logprob == pytest.approx(math.log(0.5), abs=1e-5)
