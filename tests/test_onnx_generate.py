"""OnnxGenerator (slmkit.generate.onnx) follows generation's rules: the context rule of every path,
and TextStream's stop strings."""

from __future__ import annotations

import warnings

import pytest
import torch

from slmkit.export import export_onnx
from slmkit.generate.onnx import OnnxGenerator

from export_models import ONNX_VARIANTS, PROMPT, our_greedy, random_model, tok  # noqa: F401 - tok is a fixture


@pytest.mark.parametrize("variant", ["gpt2", "llama-gqa"])
def test_every_generation_path_slides_the_context_the_same_way(tmp_path, tok, variant):
    """One context rule for every path: a prompt longer than the context is cut from the left, and
    a full window slides to its last block_size // 2 tokens. 80 greedy tokens run past the
    32-token context several times; PyTorch without a cache, with the module KV cache, with
    decode_step, the CPU decoder ("fast") and onnxruntime give the same tokens as the rule
    written out by hand, which here differ from nanoGPT's rule."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from slmkit.decode import CPUDecoder, NativeDecoder, pick
    from slmkit.generate import SamplingConfig, generate_tokens

    model = random_model(tok.vocab_size, **ONNX_VARIANTS[variant])
    assert pick(model) in (NativeDecoder, CPUDecoder)  # so "fast" is a CPU decoder, not decode_step again
    gen = OnnxGenerator(export_onnx(model, tok, tmp_path / "onnx"), threads=1)
    cfg = SamplingConfig(max_new_tokens=80, temperature=0.0, stop_at_eot=False)
    g = torch.Generator().manual_seed(1)
    for length in (5, 20, 45):  # 45 > 32: cut, with a warning, on every path
        prompt = torch.randint(0, tok.vocab_size, (length,), generator=g).tolist()
        expected = our_greedy(model, prompt, 80, eot=None)
        assert len(set(expected)) > 10  # varied text, not one token repeated
        assert expected != our_greedy(model, prompt, 80, eot=None, keep=31)  # the rule shows in the tokens
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for path in ("uncached", "cached", "step", "fast"):
                assert generate_tokens(model, [prompt], cfg, path=path) == [expected], path
            assert gen.generate(prompt, 80, stop_at_eot=False) == expected
        cut = [w for w in caught if "longer than the context" in str(w.message)]
        assert len(cut) == (5 if length > 32 else 0)


def test_generate_text_is_slm_generates_text_with_stop_strings(tmp_path, tok):
    """generate_text gives what slm generate's text API gives greedily (same tokens, decoded by the
    same TextStream), and cuts right before a stop string as it does; generation stops there."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from slmkit.generate import SamplingConfig, generate

    model = random_model(tok.vocab_size, **ONNX_VARIANTS["llama-gqa"])
    gen = OnnxGenerator(export_onnx(model, tok, tmp_path / "onnx"), threads=1)
    full = generate(model, tok, [PROMPT], SamplingConfig(max_new_tokens=40, temperature=0.0))[0]
    assert gen.generate_text(PROMPT, 40) == full
    assert len(full) > 20
    stop = full[12:15]
    cut = full[: full.find(stop)]
    assert len(cut) < len(full)  # the stop string does cut the text
    assert gen.generate_text(PROMPT, 40, stop=[stop]) == cut
    assert generate(model, tok, [PROMPT], SamplingConfig(max_new_tokens=40, temperature=0.0, stop=[stop]))[0] == cut
    calls = []
    real = gen.step
    gen.step = lambda *a: calls.append(1) or real(*a)
    gen.generate_text(PROMPT, 40, stop=[stop])
    assert len(calls) < 40  # it stopped at the stop string, not after max_new_tokens
