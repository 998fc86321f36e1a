"""TorchScript export and PyTorch int8 (slmkit.export.torchscript)."""

from __future__ import annotations

import json

import pytest
import torch

from slmkit.export import export_torchscript, quantize_int8

from export_models import LLAMA, random_model, tok  # noqa: F401 - tok is a fixture

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:DeprecationWarning")


def test_torchscript_matches(tmp_path, tok):
    model = random_model(tok.vocab_size, **LLAMA, n_kv_head=2)
    out = export_torchscript(model, tok, tmp_path / "ts")
    loaded = torch.jit.load(str(out / "model.pt"))
    for shape in [(1, 1), (2, 9), (3, 32)]:
        x = torch.randint(0, tok.vocab_size, shape)
        with torch.no_grad():
            assert (loaded(x) - model(x)[0]).abs().max().item() < 1e-4
    extra = {"slmkit_export.json": ""}
    torch.jit.load(str(out / "model.pt"), _extra_files=extra)
    assert json.loads(extra["slmkit_export.json"])["eot_id"] == tok.eot_id



def test_int8_quantized_eager_model_generates_on_the_default_path(tok):
    """quantize_int8 packs the linear weights: the default "fast" path must fall back to the
    module path (not fail reading .weight), and forcing decode_step says what to do instead."""
    from slmkit.decode import reads_float_weights
    from slmkit.generate import SamplingConfig, generate_tokens

    model = quantize_int8(random_model(tok.vocab_size, **LLAMA, n_embd=64, n_layer=2))
    assert not reads_float_weights(model)
    cfg = SamplingConfig(max_new_tokens=10, temperature=0.0, stop_at_eot=False)
    prompts = [[5, 6, 7], [8]]
    lengths = []  # tokens per row of every forward call with the cache: the prefill, then one per step
    real = model.forward
    model.forward = lambda idx, *a, cache, **kw: lengths.append(idx.size(1)) or real(idx, *a, cache=cache, **kw)
    out = generate_tokens(model, prompts, cfg)
    assert lengths == [3] + [1] * 9 and all(len(row) == 10 for row in out)
    with pytest.raises(ValueError, match="path='cached'"):
        generate_tokens(model, prompts, cfg, path="step")
