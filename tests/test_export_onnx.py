"""ONNX export (slmkit.export.onnx): both graphs run in onnxruntime give our logits and greedy text."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slmkit.export import OnnxGenerator, export_onnx

from export_models import ONNX_VARIANTS, PROMPT, our_greedy, random_model, tok  # noqa: F401 - tok is a fixture


@pytest.mark.parametrize("variant", ONNX_VARIANTS)
def test_onnx_matches_onnxruntime(tmp_path, tok, variant):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = random_model(tok.vocab_size, **ONNX_VARIANTS[variant])
    gen = OnnxGenerator(export_onnx(model, tok, tmp_path / "onnx"), threads=1)
    x = torch.randint(0, tok.vocab_size, (3, 20))
    with torch.no_grad():
        ref = model(x)[0].numpy()
    assert np.abs(gen.logits(x.numpy()) - ref).max() < 1e-4  # full-sequence graph, other shape than traced
    # KV-cache graph: a prefill of 8 tokens, then one token per call, gives the same logits.
    logits, k, v = gen.step(x[:, :8].numpy(), gen.empty_past(3), gen.empty_past(3))
    parts = [logits]
    for t in range(8, 20):
        logits, k, v = gen.step(x[:, t : t + 1].numpy(), k, v)
        parts.append(logits)
    assert k.shape == (2, 3, model.config.kv_heads, 20, model.config.head_dim)
    assert np.abs(np.concatenate(parts, axis=1) - ref).max() < 1e-4
    # Greedy text, 40 new tokens: runs past the 32-token context, so the window slides too.
    prompt = tok.encode(PROMPT)
    assert len(prompt) + 40 > model.config.block_size
    ours = our_greedy(model, prompt, 40, tok.eot_id)
    assert gen.generate(prompt, 40) == ours
    assert gen.generate_text(PROMPT, 40) == tok.decode([t for t in ours if t != tok.eot_id])
