"""Runners: the KV cache paths == the uncached reference, which decoder each path runs (the CPU
and graph decoders through generation), the context rule (window slides, long prompts), batches ==
one-by-one runs. The decoders' logits against model.forward are in test_decode.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import slmkit.generate as G
from slmkit.decode import ANY, BACKENDS, CPUDecoder, GraphDecoder, NativeDecoder, StepDecoder, placement
from slmkit.generate import SamplingConfig, beam_search, generate_tokens

from conftest import cpu_capture
from generation_models import GREEDY, one_thread, random_model  # noqa: F401 (one_thread: a fixture)


# --- the KV cache ---------------------------------------------------------------------------------

VARIANTS = [
    dict(positions=pos, n_kv_head=kv, norm=norm, activation=act)
    for pos, kv, norm, act in itertools.product(["learned", "rope"], [None, 2], ["layernorm", "rmsnorm"], ["gelu", "swiglu"])
]


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_cache_matches_uncached_for_every_variant(kw):
    model = random_model(1, **kw, bias=kw["norm"] == "layernorm")
    with torch.no_grad():  # non-zero biases and uneven norm weights (were 0 and 6): every path must apply them
        g = torch.Generator().manual_seed(4)
        for name, p in model.named_parameters():
            if p.ndim == 1:
                noise = torch.randn(p.shape, generator=g)
                p.copy_(6.0 * (1.0 + 0.3 * noise) if name.endswith("weight") else 0.5 * noise)
    prompt = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(2)).tolist()
    cfg = SamplingConfig(max_new_tokens=40, **GREEDY)  # 9 + 40 > 24: the window slides twice
    reference = generate_tokens(model, prompt, cfg, path="uncached")
    assert len(set(reference[0])) > 3  # the text is not one repeated token
    assert generate_tokens(model, prompt, cfg, path="cached") == reference
    assert generate_tokens(model, prompt, cfg, path="step") == reference
    assert generate_tokens(model, prompt, cfg, path="fast") == reference  # NativeDecoder here (C++)
    assert generate_tokens(model, prompt, cfg, path="numpy") == reference  # CPUDecoder
    # A backend by name: the graph decoder's fixed-shape step runs on the CPU without graphs.
    assert generate_tokens(model, prompt, cfg, path="cuda-graph") == reference
    # The logits of every decoder against model.forward: test_decode.py.


def test_fast_path_is_the_cpu_decoder_for_float32_and_decode_step_otherwise(monkeypatch):
    """"fast" steps through CPUDecoder for a float32 CPU model. CPUDecoder is float32-only, so on
    a bf16 model "fast" steps through the PyTorch step (StepDecoder, not the module path): checked by counting
    its calls, and by its logits along the float32 model's greedy tokens, which must be as close
    to the float32 ones as the bf16 module path's ("cached", another computation) are. (The C++
    decoder, listed before the NumPy one, is set aside here; tests/test_decode_native.py has it.)"""
    monkeypatch.setattr(NativeDecoder, "devices", ())
    calls = []
    real_step = CPUDecoder.step
    monkeypatch.setattr(CPUDecoder, "step", lambda self, idx, cache: calls.append(cache.length) or real_step(self, idx, cache))
    cfg = SamplingConfig(max_new_tokens=12, **GREEDY)
    tokens = generate_tokens(random_model(12), [[1, 2, 3]], cfg)[0]
    assert calls == list(range(3, 14))  # one step per new token after the first (from the prefill)
    calls.clear()
    model = random_model(12).to(torch.bfloat16)
    assert not CPUDecoder.supports(model, *placement(model))
    with pytest.raises(ValueError, match="float32"):
        CPUDecoder(model)
    real_decode_step = StepDecoder.step
    steps = []
    monkeypatch.setattr(StepDecoder, "step", lambda self, idx, cache: steps.append(cache.length) or real_decode_step(self, idx, cache))
    with torch.inference_mode():
        runners = {"fast": G.make_runner("fast", model, [[1, 2, 3]], 12),
                   "cached": G.make_runner("cached", model, [[1, 2, 3]], 12),
                   "fp32": G.make_runner("uncached", random_model(12), [[1, 2, 3]], 12)}
        errors: dict[str, list[float]] = {"fast": [], "cached": []}
        for token in tokens[:-1]:  # teacher-forced: the same context on every path, whatever bf16 picks
            for path in runners:
                runners[path].advance([token])
            for path in errors:
                errors[path].append((runners[path].logits - runners["fp32"].logits).abs().max().item())
    assert steps == list(range(3, 14)) and calls == []  # "fast" stepped through StepDecoder; "cached" never did
    assert 0 < max(errors["fast"]) <= 2 * max(errors["cached"]) + 0.05, errors
    assert max(errors["fast"]) < 0.1 * runners["fp32"].logits.abs().max().item()


@pytest.fixture
def graph_step_on_cpu(monkeypatch):
    """Generation's "fast" path through ``GraphDecoder`` on the CPU, with its record-and-replay
    logic driven by CPUGraph: how CI checks what a GPU replays. Yields the decoders made."""
    made = []

    class OnTheCPU(GraphDecoder):  # the registry's graph backend, offered on the CPU, with graphs
        devices = ANY

        def __init__(self, model) -> None:
            super().__init__(model, graphs=True)
            made.append(self)

    monkeypatch.setattr(GraphDecoder, "_capture", cpu_capture)
    monkeypatch.setitem(BACKENDS, "cuda-graph", OnTheCPU)
    monkeypatch.setattr(CPUDecoder, "devices", ())  # else "fast" is the NumPy decoder here
    monkeypatch.setattr(NativeDecoder, "devices", ())  # or the C++ one
    yield made


@pytest.mark.parametrize("kw", VARIANTS[::3], ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_graph_decoder_step_gives_the_uncached_tokens(kw, graph_step_on_cpu):
    """Attention over every slot with a mask made from the filled length, the new key and value
    written at a slot index held in a tensor, and a graph per cache: the same tokens as the uncached
    reference through window slides, a padded batch, a row that finishes early and beam search."""
    model = random_model(2, **kw, bias=kw["norm"] == "layernorm")
    g = torch.Generator().manual_seed(8)
    prompt = torch.randint(0, 61, (1, 9), generator=g).tolist()
    cfg = SamplingConfig(max_new_tokens=40, **GREEDY)  # 9 + 40 > 24: the window slides at 24 and 36
    assert generate_tokens(model, prompt, cfg, path="fast") == generate_tokens(model, prompt, cfg, path="uncached")
    assert graph_step_on_cpu[-1].recorded_at == [10, 13, 13]  # the 2nd step on each cache (9 slots prefilled, then 12)

    prompts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (3, 11, 1)]
    cfg = SamplingConfig(max_new_tokens=12, **GREEDY)
    alone = [generate_tokens(model, [p], cfg, path="uncached")[0] for p in prompts]
    gen = G.Generation(model, prompts, cfg, path="fast")
    for _ in range(5):
        gen.step()
    gen.finish(1)  # row 1 leaves the batch: a new, smaller cache, so a new graph
    while not gen.finished:
        gen.step()
    assert gen.tokens == [alone[0], alone[1][:5], alone[2]]
    assert graph_step_on_cpu[-1].recorded_at == [12, 17]

    beams = SamplingConfig(max_new_tokens=20, beams=3)
    assert beam_search(model, prompt[0], beams, path="fast") == beam_search(model, prompt[0], beams, path="uncached")
    assert not hasattr(graph_step_on_cpu[-1], "recorded_at")  # beams reorder the cache every step: never recorded
    assert len(graph_step_on_cpu) == 3


def test_forward_for_training_is_unchanged():
    model = random_model(0)
    x = torch.randint(0, 61, (2, 24))
    logits, loss = model(x, x)
    assert logits.shape == (2, 24, 61) and loss.ndim == 0


def test_window_slides_past_the_context():
    """Past block_size tokens each row keeps its last block_size // 2 and goes on."""
    model = random_model(4, block_size=16)
    cfg = SamplingConfig(max_new_tokens=50, **GREEDY)
    out = generate_tokens(model, [[1, 2, 3]], cfg)[0]
    assert len(out) == 50
    # Replay the rule by hand: before each step the context is the tokens since the last slide.
    context = [1, 2, 3]
    for token in out:
        logits, _ = model(torch.tensor([context]))
        assert int(logits[0, -1].argmax()) == token
        context.append(token)
        if len(context) > 16:
            context = context[-8:]


def test_long_prompt_is_cut_from_the_left_with_a_warning():
    model = random_model(5)
    prompt = list(range(40))
    cfg = SamplingConfig(max_new_tokens=5, **GREEDY)
    with pytest.warns(UserWarning, match="longer than the context"):
        out = generate_tokens(model, [prompt], cfg)
    assert out == generate_tokens(model, [prompt[-24:]], cfg)


@pytest.mark.parametrize("kw", [dict(), dict(positions="learned", n_kv_head=2)])
@pytest.mark.parametrize("path", ["fast", "cached"])
def test_batch_equals_one_by_one(kw, path):
    model = random_model(6, **kw)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (3, 11, 1, 7)]
    cfg = SamplingConfig(max_new_tokens=12, **GREEDY)  # 11 + 12 <= 24: within the context
    alone = [generate_tokens(model, [p], cfg, path="uncached")[0] for p in prompts]
    assert generate_tokens(model, prompts, cfg, path=path) == alone
