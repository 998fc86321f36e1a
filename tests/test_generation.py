"""Generation of a batch (finished rows leave it) and beam search (against transformers too).
"""

from __future__ import annotations

import math

import pytest
import torch

from slmkit.generate import Generation, SamplingConfig, beam_search, generate, generate_tokens
from slmkit.model import GPT

from generation_models import GREEDY, TOK, bigram_model, one_thread, random_model, script_model  # noqa: F401 (one_thread: a fixture)


def test_finished_rows_leave_the_batch():
    model = script_model("abc", then_eot=True)  # "a" -> "bc" then <|endoftext|>
    gen = Generation(model, [[ord("a")], [ord("x")], [ord("b")]], SamplingConfig(max_new_tokens=6, temperature=0), TOK.eot_id)
    while not gen.finished:
        gen.step()
    assert gen.tokens[0] == [ord("b"), ord("c")] and gen.tokens[2] == [ord("c")]
    assert len(gen.tokens[1]) == 6  # "x" is not in the script: it never writes <|endoftext|>


# --- beam search ----------------------------------------------------------------------------------


def test_beam_search_finds_what_greedy_misses():
    # From token 0: 1 is likelier (0.6) than 2 (0.4), but after 1 the model is unsure (three ways,
    # 1/3 each) while after 2 it is sure (0.95). Best sequence: 0 2 6 (0.38) over 0 1 x (0.2).
    lp = math.log
    model = bigram_model({0: {1: lp(0.6), 2: lp(0.4)}, 1: {3: lp(1 / 3), 4: lp(1 / 3), 5: lp(1 / 3)},
                          2: {6: lp(0.95), 3: lp(0.05)}, 3: {9: 0.0}, 4: {9: 0.0}, 5: {9: 0.0}, 6: {9: 0.0}},
                         vocab_size=10)
    greedy = generate_tokens(model, [[0]], SamplingConfig(max_new_tokens=5, temperature=0), eot_id=9)[0]
    beams = beam_search(model, [0], SamplingConfig(max_new_tokens=5, beams=2), eot_id=9)
    assert greedy[:1] == [1] and beams == [2, 6]
    assert generate_tokens(model, [[0]], SamplingConfig(max_new_tokens=5, beams=2), eot_id=9) == [[2, 6]]


def test_beam_search_paths_agree_and_one_beam_is_greedy():
    model = random_model(10)
    cfg = SamplingConfig(max_new_tokens=30, beams=3, length_penalty=0.8)
    fast = beam_search(model, [5, 6, 7], cfg)
    assert len(fast) == 30 and beam_search(model, [5, 6, 7], cfg, path="uncached") == fast
    cfg.beams = 1
    assert beam_search(model, [5, 6, 7], cfg) == generate_tokens(model, [[5, 6, 7]], SamplingConfig(max_new_tokens=30, **GREEDY))[0]


def test_beam_search_finishes_only_the_best_candidates_of_a_step():
    """As Hugging Face: of a step's 2N candidates only the N best may finish. Here, at step 2 the
    order is [1, eot], [1, 5], [2, eot], [2, 7]: [2, eot] is a spare, not a finished text. Had it
    counted, two texts would be finished and at step 3 the best live beam (-2.33 / 3) would look
    unable to beat the worse of them (-1.51 / 2), ending the search with [1]; instead it goes on
    to [1, 5, 10, 16] (-2.33 / 5), which beats [1] (-1.20 / 2). (transformers gives the same.)"""
    lp = math.log
    model = bigram_model({0: {1: lp(0.6), 2: lp(0.4)}, 1: {9: lp(0.5), 5: lp(0.45), 3: lp(0.05)},
                          2: {9: lp(0.55), 7: lp(0.45)}, 5: {10: lp(0.36), 11: lp(0.33), 12: lp(0.31)},
                          7: {13: lp(0.4), 14: lp(0.3), 15: lp(0.3)}, 10: {16: 0.0}, 11: {17: 0.0},
                          16: {9: 0.0}, 17: {9: 0.0}}, vocab_size=32)
    assert beam_search(model, [0], SamplingConfig(max_new_tokens=8, beams=2), eot_id=9) == [1, 5, 10, 16]
    # A length penalty of 0.5 favours shorter texts: [1] wins (-1.20 / 2 ** 0.5 against -2.33 / 5 ** 0.5).
    assert beam_search(model, [0], SamplingConfig(max_new_tokens=8, beams=2, length_penalty=0.5), eot_id=9) == [1]


def hf_twin(model: GPT):
    """The same model as a transformers GPT-2 or Llama module, through slmkit's export mapping."""
    transformers = pytest.importorskip("transformers")
    from slmkit.export import hf_config, hf_state_dict

    config = {k: v for k, v in hf_config(model.config, None).items() if k != "architectures"}
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config)).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} and model.config.tie_embeddings == bool(missing)
    x = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x)[0], rtol=0, atol=1e-4)
    return hf


@pytest.mark.parametrize("seed,kw", [(0, dict()), (1, dict(positions="learned", norm="layernorm", activation="gelu"))],
                         ids=["llama", "gpt2"])
def test_beam_search_matches_transformers(seed, kw):
    """The same tokens as Hugging Face's ``generate(num_beams=N, do_sample=False,
    repetition_penalty=R, length_penalty=L)``: the penalty on log-probabilities, only the N best
    candidates of a step may finish, the early-stopping rule. <|endoftext|> is a token the model
    likes, so hypotheses end at many lengths and the length penalty matters."""
    model = random_model(seed, scale=3.0, block_size=64, **kw)  # flatter than x6: more beams in the running
    hf = hf_twin(model)
    g, ended, total = torch.Generator().manual_seed(seed), 0, 0
    for length in (3, 5, 7):
        prompt = torch.randint(0, 61, (length,), generator=g).tolist()
        eot = generate_tokens(model, [prompt], SamplingConfig(max_new_tokens=5, **GREEDY))[0][4]
        for beams, penalty, length_penalty in [(2, 1.3, 1.0), (3, 1.5, 0.5), (4, 1.2, 2.0), (3, 0.8, 1.0), (4, 1.0, 1.5)]:
            cfg = SamplingConfig(max_new_tokens=16, beams=beams, repetition_penalty=penalty, length_penalty=length_penalty)
            ours = beam_search(model, prompt, cfg, eot)
            with torch.no_grad():
                out = hf.generate(torch.tensor([prompt]), num_beams=beams, do_sample=False, max_new_tokens=16,
                                  repetition_penalty=penalty, length_penalty=length_penalty,
                                  eos_token_id=eot, pad_token_id=eot)[0, length:].tolist()
            theirs = out[: out.index(eot)] if eot in out else out  # ours leaves <|endoftext|> out
            assert ours == theirs, (prompt, beams, penalty, length_penalty)
            ended, total = ended + (len(theirs) < 16), total + 1
    assert 0 < ended < total  # some hypotheses end at <|endoftext|>, some run to max_new_tokens


def test_beam_search_honours_stop_strings():
    model = script_model("Ha!ZQ_STOP.wxyz")
    cfg = SamplingConfig(max_new_tokens=30, beams=2, stop=["STOP"])
    assert generate(model, TOK, ["H"], cfg) == ["a!ZQ_"]


def test_nucleus_sampling_draws_in_cpp_the_reference_tokens(monkeypatch):
    """Nucleus sampling alone (no top-k, min-p or repetition penalty) draws through native_top_p,
    from the numbers choose would draw: the reference processors' tokens, row by row."""
    import slmkit.generate.generation as G

    if not G.native_sampling(torch.device("cpu")):
        pytest.skip("the C++ library is not built here")
    calls = []
    native = G.native_top_p
    monkeypatch.setattr(G, "native_top_p", lambda *a: calls.append(1) or native(*a))
    model = random_model(4, scale=3.0)
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    for seed, temperature, top_p in [(0, 0.8, 0.95), (1, 1.3, 0.5), (2, 0.6, 0.99)]:
        cfg = SamplingConfig(max_new_tokens=12, temperature=temperature, top_k=0, top_p=top_p, seed=seed,
                             stop_at_eot=False)
        fast, ref = Generation(model, prompts, cfg), Generation(model, prompts, cfg)
        assert fast._native
        ref._native = False  # the PyTorch processors and choose
        while not fast.finished:
            assert fast.step() == ref.step()
        assert ref.finished
    assert len(calls) == 3 * 12
    cfg = SamplingConfig(max_new_tokens=4, temperature=0.8, top_k=40, top_p=0.9, seed=0)
    assert not Generation(model, prompts, cfg)._native  # top-k: the reference pipeline
