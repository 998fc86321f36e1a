import math

import numpy as np
import pytest
import torch

from slmkit.errors import SlmError
from slmkit.evaluate import evaluate_run, evaluate_tokens
from slmkit.model import GPT, ModelConfig


def uniform_model(vocab: int = 16, block: int = 8) -> GPT:
    """A model whose logits are all zero: every token has probability 1/vocab."""
    model = GPT(ModelConfig(vocab_size=vocab, block_size=block, n_layer=1, n_head=2, n_embd=8, tie_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def test_metrics_of_a_uniform_model_by_hand():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 16, size=50)
    m = evaluate_tokens(uniform_model(), tokens, n_bytes=100, batch_size=4)
    # 6 windows of 8 cover 48 predictions; the tail adds the 49th: every token after the first.
    assert m["tokens"] == 49
    assert m["loss"] == pytest.approx(math.log(16), rel=1e-6)
    assert m["perplexity"] == pytest.approx(16, rel=1e-5)
    assert m["bpb"] == pytest.approx(49 * math.log(16) / math.log(2) / 100, rel=1e-6)  # 49*4 bits / 100 bytes
    # All logits tie, argmax picks id 0: accuracy is the share of targets equal to 0.
    assert m["accuracy"] == pytest.approx(np.mean(tokens[1:] == 0))


def test_eval_run_on_data_and_on_text(run_dir, data_dir, corpus_file):
    on_data = evaluate_run(run_dir, data_dir=data_dir)
    on_text = evaluate_run(run_dir, input_path=str(corpus_file))
    for m in (on_data, on_text):
        assert 0 < m["loss"] < math.log(300) and m["bpb"] > 0 and 0 < m["accuracy"] <= 1
        assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))


def test_eval_needs_exactly_one_source(run_dir, data_dir):
    with pytest.raises(SlmError, match="exactly one"):
        evaluate_run(run_dir)
