"""Sampler: greedy, temperature, top-k/top-p filtering, per-request seeds, and the sampled distribution."""

from __future__ import annotations

import math

import pytest
import torch

from kunserve.agent.engine.sampler import Sampler, step_seed
from kunserve.agent.engine.sequence import SamplingParams

torch.set_num_threads(1)

CPU = torch.device("cpu")
LOGITS4 = [1.0, 0.5, -0.5, 2.0]  # softmax ~ [0.220, 0.133, 0.049, 0.598]


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [x / sum(e) for x in e]


def _random_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _counts(tokens: list[int], vocab: int) -> list[int]:
    return [tokens.count(t) for t in range(vocab)]


def test_greedy_is_argmax() -> None:
    logits = _random_logits(6, 50, 0)
    logits[2, 17] = 100.0
    params = [SamplingParams(temperature=0.0)] * 6
    out = Sampler(CPU, seed=0)(logits, params, [0] * 6)
    assert out == logits.argmax(dim=-1).tolist()
    assert out[2] == 17


def test_greedy_rows_stay_argmax_in_a_mixed_batch() -> None:
    logits = _random_logits(4, 30, 1)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.5),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=2.0, seed=3),
    ]
    out = Sampler(CPU, seed=0)(logits, params, [0, 0, 5, 9])
    argmax = logits.argmax(dim=-1).tolist()
    assert (out[0], out[2]) == (argmax[0], argmax[2])


@pytest.mark.parametrize("temperature", [0.1, 1.0, 5.0, 100.0])
def test_top_k_one_is_greedy_whatever_the_temperature(temperature: float) -> None:
    logits = _random_logits(8, 40, 2)
    params = [SamplingParams(temperature=temperature, top_k=1)] * 8
    sampler = Sampler(CPU, seed=0)
    for step in range(5):
        assert sampler(logits, params, [step] * 8) == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 10.0])
def test_tiny_top_p_keeps_only_the_top_token(temperature: float) -> None:
    logits = _random_logits(8, 40, 3)
    params = [SamplingParams(temperature=temperature, top_p=1e-6)] * 8
    sampler = Sampler(CPU, seed=1)
    for step in range(5):
        assert sampler(logits, params, [step] * 8) == logits.argmax(dim=-1).tolist()


def test_seeded_row_is_independent_of_the_rest_of_the_batch() -> None:
    vocab = 64
    mine = _random_logits(1, vocab, 4)[0] / 3  # a flat-ish distribution: many tokens are likely
    p = SamplingParams(temperature=1.0, top_p=0.95, top_k=40, seed=1234)
    alone = [Sampler(CPU, seed=0)(mine.unsqueeze(0), [p], [step])[0] for step in range(40)]
    assert len(set(alone)) > 5  # really random, not a constant

    others = [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, seed=99, top_k=5),
        SamplingParams(temperature=1.0, top_p=0.5),
    ]
    for position in range(4):
        sampler = Sampler(CPU, seed=position + 10)  # the unseeded generator state must not matter
        got = []
        for step in range(40):
            batch = _random_logits(5, vocab, 100 + step + position)  # other rows change every step
            batch[position] = mine
            params = list(others)
            params.insert(position, p)
            steps = [step + 7, 3, 0, 11, step + 1]  # the other rows' output indexes
            steps[position] = step
            got.append(sampler(batch, params, steps)[position])
        assert got == alone, f"seeded row at batch position {position} changed"


def test_same_seed_same_stream_different_seeds_differ() -> None:
    vocab = 100
    flat = torch.zeros(1, vocab)

    def stream(seed: int) -> list[int]:
        p = SamplingParams(temperature=1.0, seed=seed)
        sampler = Sampler(CPU)  # unseeded generator: irrelevant for seeded requests
        return [sampler(flat, [p], [step])[0] for step in range(60)]

    a, a2, b = stream(1), stream(1), stream(2)
    assert a == a2
    assert len(set(a)) > 30  # 60 draws over 100 equally likely tokens
    same = sum(x == y for x, y in zip(a, b, strict=True))
    assert same < 10  # ~0.6 expected by chance


def test_seeded_step_reproduces_a_single_draw() -> None:
    logits = _random_logits(1, 50, 5)
    p = SamplingParams(temperature=0.9, seed=42)
    s1 = Sampler(CPU)
    s2 = Sampler(CPU)
    seq_draws = [s1(logits, [p], [k])[0] for k in range(20)]
    # Drawing only step 13 (e.g. after a preemption or on another process) gives the same token.
    assert s2(logits, [p], [13])[0] == seq_draws[13]
    assert s2(logits, [p], [0])[0] == seq_draws[0]


def test_step_seed_is_deterministic_63_bit_and_varies() -> None:
    seeds = [step_seed(7, k) for k in range(1000)]
    assert seeds == [step_seed(7, k) for k in range(1000)]
    assert len(set(seeds)) == 1000
    assert all(0 <= s < 2**63 for s in seeds)
    assert step_seed(7, 0) != step_seed(8, 0)
    assert step_seed(0, 0) != step_seed(0, 1)
    assert len({step_seed(s, 0) for s in range(1000)}) == 1000
    assert 0 <= step_seed(2**64 - 1, 10**9) < 2**63
    # Neither argument passes through unchanged or trivially.
    assert step_seed(0, 0) not in (0, 1)


def test_unseeded_sampler_seed_reproduces() -> None:
    logits = _random_logits(16, 30, 6)
    params = [SamplingParams(temperature=1.0)] * 16
    a = Sampler(CPU, seed=5)(logits, params, [0] * 16)
    b = Sampler(CPU, seed=5)(logits, params, [0] * 16)
    c = Sampler(CPU, seed=6)(logits, params, [0] * 16)
    assert a == b
    assert a != c


# ---- the sampled distribution ----------------------------------------------------------------------------

N_DRAWS = 4000


def _draw(params: SamplingParams, seed: int = 0) -> list[int]:
    logits = torch.tensor([LOGITS4] * N_DRAWS)
    return Sampler(CPU, seed=seed)(logits, [params] * N_DRAWS, [0] * N_DRAWS)


def test_temperature_one_matches_softmax() -> None:
    freq = [c / N_DRAWS for c in _counts(_draw(SamplingParams(temperature=1.0)), 4)]
    expected = _softmax(LOGITS4)
    assert max(abs(f - e) for f, e in zip(freq, expected, strict=True)) < 0.03
    chi2 = sum((f - e) ** 2 / e for f, e in zip(freq, expected, strict=True)) * N_DRAWS
    assert chi2 < 16.27  # chi-square, 3 degrees of freedom, p = 0.001


def test_seeded_draws_match_softmax_too() -> None:
    logits = torch.tensor([LOGITS4])
    sampler = Sampler(CPU)
    tokens = [sampler(logits, [SamplingParams(temperature=1.0, seed=s)], [0])[0] for s in range(N_DRAWS)]
    freq = [c / N_DRAWS for c in _counts(tokens, 4)]
    assert max(abs(f - e) for f, e in zip(freq, _softmax(LOGITS4), strict=True)) < 0.03


def test_temperature_sharpens_and_flattens() -> None:
    hot = [c / N_DRAWS for c in _counts(_draw(SamplingParams(temperature=4.0)), 4)]
    cold = [c / N_DRAWS for c in _counts(_draw(SamplingParams(temperature=0.25)), 4)]
    assert max(abs(f - e) for f, e in zip(hot, _softmax([x / 4 for x in LOGITS4]), strict=True)) < 0.03
    assert max(abs(f - e) for f, e in zip(cold, _softmax([x * 4 for x in LOGITS4]), strict=True)) < 0.03


def test_top_k_zeroes_the_rest_exactly() -> None:
    counts = _counts(_draw(SamplingParams(temperature=1.0, top_k=2)), 4)
    assert counts[1] == 0 and counts[2] == 0
    expected = _softmax([LOGITS4[0], LOGITS4[3]])
    assert abs(counts[0] / N_DRAWS - expected[0]) < 0.03
    assert abs(counts[3] / N_DRAWS - expected[1]) < 0.03
    probs = Sampler._probs(torch.tensor([LOGITS4]), [SamplingParams(temperature=1.0, top_k=2)])[0]
    assert probs[1].item() == 0.0 and probs[2].item() == 0.0
    assert probs.tolist() == pytest.approx([expected[0], 0.0, 0.0, expected[1]], abs=1e-6)


def test_top_p_zeroes_the_rest_exactly() -> None:
    # softmax ~ [0.220, 0.133, 0.049, 0.598]: the top token alone has 0.598 < 0.7, so the second
    # (index 0) is kept; 0.818 >= 0.7 so indices 1 and 2 are dropped.
    params = SamplingParams(temperature=1.0, top_p=0.7)
    counts = _counts(_draw(params), 4)
    assert counts[1] == 0 and counts[2] == 0
    sm = _softmax(LOGITS4)
    kept = sm[0] + sm[3]
    assert abs(counts[0] / N_DRAWS - sm[0] / kept) < 0.03
    assert abs(counts[3] / N_DRAWS - sm[3] / kept) < 0.03
    probs = Sampler._probs(torch.tensor([LOGITS4]), [params])[0]
    assert probs[1].item() == 0.0 and probs[2].item() == 0.0
    assert probs.tolist() == pytest.approx([sm[0] / kept, 0.0, 0.0, sm[3] / kept], abs=1e-6)


def test_top_p_exactly_at_a_boundary_keeps_the_prefix_reaching_it() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    probs = Sampler._probs(logits, [SamplingParams(temperature=1.0, top_p=0.75)])[0]
    # 0.5 + 0.25 reaches 0.75: the third token is dropped.
    assert probs.tolist() == pytest.approx([2 / 3, 1 / 3, 0.0, 0.0], abs=1e-6)
    assert probs[2].item() == 0.0 and probs[3].item() == 0.0


def test_top_k_and_top_p_combined_per_row() -> None:
    logits = torch.tensor([LOGITS4, LOGITS4, LOGITS4])
    params = [
        SamplingParams(temperature=1.0, top_k=3),
        SamplingParams(temperature=1.0, top_p=0.5),
        SamplingParams(temperature=1.0),
    ]
    probs = Sampler._probs(logits, params)
    sm = _softmax(LOGITS4)
    k3 = sum(sm) - sm[2]
    assert probs[0].tolist() == pytest.approx([sm[0] / k3, sm[1] / k3, 0.0, sm[3] / k3], abs=1e-6)
    assert probs[1].tolist() == pytest.approx([0.0, 0.0, 0.0, 1.0], abs=1e-6)
    assert probs[2].tolist() == pytest.approx(sm, abs=1e-6)
    assert probs[0, 2].item() == 0.0
