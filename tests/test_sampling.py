"""Sampling: each logits processor's effect, the draw, option validation, seeds.
"""

from __future__ import annotations

import math

import pytest
import torch

import slmkit.generate.sampling as G
from slmkit.errors import SlmError
from slmkit.generate import (
    SamplingConfig, apply_min_p, apply_repetition_penalty, apply_temperature, apply_top_k, apply_top_k_top_p,
    apply_top_p, generate_tokens, logits_pipeline,
)

from generation_models import GREEDY, bigram_model, one_thread, random_model  # noqa: F401 (one_thread: a fixture)


# --- logits processors ----------------------------------------------------------------------------


def test_top_k_keeps_exactly_the_k_largest_and_never_samples_outside():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    out = apply_top_k(logits, 5)
    assert (out.isfinite().sum(-1) == 5).all()
    top = logits.topk(5).indices
    assert torch.equal(out.gather(-1, top), logits.gather(-1, top))
    draws = torch.multinomial(out.softmax(-1), 2000, replacement=True, generator=torch.Generator().manual_seed(1))
    assert all(set(d.tolist()) <= set(t.tolist()) for d, t in zip(draws, top))
    assert torch.equal(apply_top_k(logits, 1000), logits)


def test_top_k_in_generation_stays_in_the_top_k():
    model = random_model(8)
    cfg = SamplingConfig(max_new_tokens=15, temperature=2.0, top_k=2, top_p=1.0, seed=3, stop_at_eot=False)
    context = [4, 5]
    for token in generate_tokens(model, [context], cfg)[0]:
        assert token in model(torch.tensor([context]))[0][0, -1].topk(2).indices.tolist()
        context.append(token)


def test_top_p_keeps_the_smallest_set_with_enough_mass():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = lambda p: set(apply_top_p(logits, p)[0].isfinite().nonzero().flatten().tolist())  # noqa: E731
    assert kept(0.45) == {1}
    assert kept(0.7) == {1, 3}
    assert kept(0.85) == {1, 3, 2}
    assert kept(1.0) == {0, 1, 2, 3}
    assert kept(0.01) == {1}  # the most likely token always stays
    out = apply_top_p(logits, 0.7)
    assert torch.allclose(out.softmax(-1)[0, [1, 3]], torch.tensor([0.5, 0.3]) / 0.8)


def test_top_k_top_p_in_one_pass_equals_top_k_then_top_p():
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(9)) * 3
    for k, p in [(40, 0.9), (300, 0.5), (1000, 0.99), (1, 0.9), (40, 1.0)]:
        assert torch.equal(apply_top_k_top_p(logits, k, p), apply_top_p(apply_top_k(logits, k), p)), (k, p)


def test_top_p_looks_among_the_first_tokens_and_sorts_only_the_flat_rows(monkeypatch):
    """``apply_top_p``'s nucleus among the ``NUCLEUS_FIRST`` largest logits, or 8x as many, keeps what
    the sort of the whole row keeps; rows whose nucleus is wider still (flat ones) and only those take
    the sort."""
    g = torch.Generator().manual_seed(5)
    peaked, flat = torch.randn(6, 4096, generator=g) * 8, torch.randn(3, 4096, generator=g) * 0.1
    medium = torch.full((2, 4096), -10.0)  # a nucleus of 100-200 tokens: past the first look, within the second
    medium[:, torch.randperm(4096, generator=g)[:200]] = 5 + torch.randn(2, 200, generator=g) * 0.5
    assert G.NUCLEUS_FIRST < 100 and 8 * G.NUCLEUS_FIRST > 200
    logits = torch.cat((peaked[:3], flat, medium[:1], peaked[3:], medium[1:]))
    sorted_rows = []
    real = G.apply_top_k_top_p
    monkeypatch.setattr(G, "apply_top_k_top_p", lambda x, k, p: (sorted_rows.append(x.size(0)), real(x, k, p))[1])
    for p in (0.5, 0.9, 0.95):
        assert torch.equal(G.apply_top_p(logits, p), real(logits, 4096, p)), p
    assert sorted_rows == [3, 3, 3]


def test_sampling_draws_the_softmax_and_never_a_removed_token(monkeypatch):
    """``choose`` (inverse-CDF, one uniform per row): frequencies match the probabilities, filtered
    (-inf) tokens never come up, and every row of a batch draws from its own distribution."""
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.15, 0.05, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([G.choose(probs.log(), 1.0, g) for _ in range(20000)])  # (n, 2)
    freq = torch.bincount(draws[:, 0], minlength=6) / len(draws)
    assert torch.allclose(freq, probs[0], atol=0.015), freq
    assert freq[1] == 0 and freq[5] == 0
    assert (draws[:, 1] == 5).all()
    # A removed last token is not drawn even by a uniform at the very top of [0, 1].
    monkeypatch.setattr(G.torch, "rand", lambda shape, generator, dtype, device: torch.ones(shape, dtype=dtype))
    assert G.choose(torch.tensor([[0.0, 0.0, -math.inf]]), 1.0, g).tolist() == [1]


def test_min_p_cuts_relative_to_the_top_token():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert apply_min_p(logits, 0.2)[0].isfinite().tolist() == [True, True, True, False]  # below 0.1
    assert apply_min_p(logits, 0.5)[0].isfinite().tolist() == [True, True, False, False]  # below 0.25
    assert torch.equal(apply_min_p(logits, 0.0), logits)


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 0.0]]
    p, q = logits.softmax(-1)[0], out.softmax(-1)[0]
    assert q[0] < p[0] and q[1] < p[1] and q[2] > p[2]
    # In generation: "a" is always a bit more likely than "b"; the penalty makes "b" win once "a" was said.
    model = bigram_model({t: {ord("a"): 2.0, ord("b"): 1.5} for t in range(257)})
    plain = generate_tokens(model, [[ord("c")]], SamplingConfig(max_new_tokens=3, **GREEDY))[0]
    penalized = generate_tokens(model, [[ord("c")]], SamplingConfig(max_new_tokens=3, repetition_penalty=2.0, **GREEDY))[0]
    assert bytes(plain) == b"aaa" and bytes(penalized) == b"aba"
    # Prompt tokens count as seen (as in CTRL and Hugging Face).
    assert bytes(generate_tokens(model, [[ord("a")]], SamplingConfig(max_new_tokens=1, repetition_penalty=2.0, **GREEDY))[0]) == b"b"


def test_temperature_and_pipeline():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    assert apply_temperature(logits, 0.5).softmax(-1)[0, 2] > logits.softmax(-1)[0, 2]
    assert logits_pipeline(SamplingConfig(temperature=0)) == []
    names = [p.func.__name__ for p in logits_pipeline(SamplingConfig(min_p=0.1, repetition_penalty=1.2), torch.zeros(1, 3, dtype=torch.bool))]
    assert names == ["apply_repetition_penalty", "apply_temperature", "apply_top_k_top_p", "apply_min_p"]
    assert [p.func.__name__ for p in logits_pipeline(SamplingConfig(top_k=5, top_p=1.0))][-1] == "apply_top_k"
    assert [p.func.__name__ for p in logits_pipeline(SamplingConfig(top_k=None, top_p=0.9))][-1] == "apply_top_p"
    assert [p.func.__name__ for p in logits_pipeline(SamplingConfig(temperature=1.0, top_k=None, top_p=1.0))] == []


@pytest.mark.parametrize("bad", [
    dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=-0.1), dict(top_k=-1),
    dict(repetition_penalty=0.0), dict(beams=0), dict(max_new_tokens=0), dict(stop=[""]), dict(seed=-1),
    dict(length_penalty=math.inf),
])
def test_validate_rejects_out_of_range(bad):
    with pytest.raises(SlmError):
        SamplingConfig(**bad).validate()


def test_seed_makes_sampling_reproducible():
    model = random_model(9)
    cfg = SamplingConfig(max_new_tokens=30, temperature=1.5, seed=123, stop_at_eot=False)
    a = generate_tokens(model, [[1, 2], [3]], cfg)
    assert generate_tokens(model, [[1, 2], [3]], cfg) == a
    cfg.seed = 124
    assert generate_tokens(model, [[1, 2], [3]], cfg) != a


# --- the C++ nucleus draw (csrc/sample.cpp) ---------------------------------------------------------


def _generators(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _uniforms(generators: list[torch.Generator]) -> list[float]:
    """The number ``choose`` draws from each generator."""
    return [torch.rand((1, 1), generator=g, dtype=torch.float64).item() for g in generators]


native = pytest.mark.skipif(not G.native_sampling(torch.device("cpu")), reason="the C++ library is not built here")


@native
@pytest.mark.parametrize("vocab", [4096, 301])
def test_native_top_p_draws_the_reference_tokens(vocab):
    g = torch.Generator().manual_seed(vocab)
    for scale, p, temperature in [(1.0, 0.9, 1.0), (3.0, 0.95, 0.8), (8.0, 0.5, 1.3), (0.3, 0.99, 0.7),
                                  (5.0, 1e-3, 1.0), (2.0, 0.999, 2.0)]:
        logits = torch.randn(24, vocab, generator=g) * scale
        logits[:4, : vocab // 3] = -math.inf  # banned tokens (logit_bias, min_tokens)
        x = apply_temperature(logits, temperature) if temperature != 1 else logits
        ref_gens, fast_gens = _generators(24), _generators(24)
        rows = [5, 0, 23, 2, 17]  # some rows, in any order
        for _ in range(3):  # each row's generator goes on drawing as in a running batch
            expected = G.choose(apply_top_p(x, p), temperature, ref_gens).tolist()
            assert G.native_top_p(logits, temperature, p, _uniforms(fast_gens)) == expected, (scale, p, temperature)
        u = _uniforms(_generators(len(rows)))
        expected = G.choose(apply_top_p(x[rows], p), temperature, _generators(len(rows))).tolist()
        assert G.native_top_p(logits, temperature, p, u, rows) == expected
        # the rows run on the decode step's pool: no thread count changes a token
        u = _uniforms(_generators(24))
        alone = G.native_top_p(logits, temperature, p, u, threads=1)
        assert all(G.native_top_p(logits, temperature, p, u, threads=t) == alone for t in (2, 3))


@native
def test_native_top_p_breaks_ties_at_the_edge_by_the_lower_id():
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(0, 6, (64, 40), generator=g).float()  # many equal logits on every nucleus edge
    p = 0.6
    # the reference cut with a stable sort: tied logits in id order
    order = torch.sort(-logits, dim=-1, stable=True).indices
    values = logits.gather(-1, order)
    probs = values.softmax(-1)
    values = values.masked_fill(probs.cumsum(-1) - probs >= p, -math.inf)
    kept = torch.full_like(logits, -math.inf).scatter(-1, order, values)
    expected = G.choose(kept, 1.0, _generators(64)).tolist()
    assert G.native_top_p(logits, 1.0, p, _uniforms(_generators(64))) == expected
    many = torch.tensor([G.native_top_p(logits, 1.0, p, _uniforms(_generators(64, seed=s))) for s in range(30)])
    assert bool(kept.gather(-1, many.T).isfinite().all())  # never a token outside that nucleus


def test_native_top_p_declares_what_it_supports():
    u = [0.5, 0.5]
    assert G.native_top_p(torch.zeros(2, 8, dtype=torch.float64), 1.0, 0.5, u) is None
    assert G.native_top_p(torch.zeros(2, 8), 1.0, 0.0, u) is None
    assert G.native_top_p(torch.zeros(2, 8), 0.0, 0.5, u) is None
    assert G.native_top_p(torch.zeros(8, 2).T, 1.0, 0.5, u) is None


def test_drawing_ahead_gives_the_numbers_of_one_draw_a_step():
    ahead = torch.rand(50, generator=torch.Generator().manual_seed(5), dtype=torch.float64).tolist()
    g = torch.Generator().manual_seed(5)
    assert ahead == [torch.rand((1, 1), generator=g, dtype=torch.float64).item() for _ in range(50)]
