import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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
    token_bytes = [0] + [2] * 15  # id 0 is a special token (no bytes), the others 2 bytes each
    m = evaluate_tokens(uniform_model(), tokens, token_bytes, batch_size=4)
    # 6 windows of 8 cover 48 predictions; the tail adds the 49th: every token after the first.
    assert m["tokens"] == 49
    assert m["loss"] == pytest.approx(math.log(16), rel=1e-6)  # every target, the special ones too
    assert m["perplexity"] == pytest.approx(16, rel=1e-5)
    # bpb: 4 bits for each text target over its 2 bytes; the special targets count in neither.
    text = int((tokens[1:] != 0).sum())
    assert 0 < text < 49
    assert m["bpb"] == pytest.approx(text * 4 / (2 * text), rel=1e-6)
    # All logits tie, argmax picks id 0: accuracy is the share of targets equal to 0.
    assert m["accuracy"] == pytest.approx(np.mean(tokens[1:] == 0))


def test_bpb_leaves_out_the_end_of_text_targets(run_dir, data_dir):
    """On real data: bpb is the text targets' nats over their bytes, and those bytes are the split's
    text (every token of the val split scored once; the first token is never a target)."""
    from slmkit.checkpoint import load_run
    from slmkit.data import load_meta, open_split

    model, tok, _ = load_run(run_dir, which="last")
    tokens = np.asarray(open_split(data_dir, "val"), dtype=np.int64)
    table = tok.token_byte_lengths()
    assert table[tok.eot_id] == 0 and tok.special_ids == [tok.eot_id]
    target_bytes = sum(table[t] for t in tokens[1:])
    assert target_bytes == load_meta(data_dir)["val"]["bytes"] - table[tokens[0]]
    m = evaluate_tokens(model, tokens, table)

    x, n, block = torch.from_numpy(tokens), len(tokens), model.config.block_size
    with torch.no_grad():  # the same windows, scored by hand
        losses = torch.cat([F.cross_entropy(model(x[None, i : min(i + block, n - 1)])[0][0], x[i + 1 : i + block + 1],
                                            reduction="none") for i in range(0, n - 1, block)])
    text = x[1:] != tok.eot_id
    assert (~text).sum() > 0
    assert m["loss"] == pytest.approx(losses.mean().item(), rel=1e-5)
    assert m["bpb"] == pytest.approx(losses[text].sum().item() / math.log(2) / target_bytes, rel=1e-5)
    # Charging the end-of-text predictions to the text (the old rule) gives a visibly higher number.
    assert losses.sum().item() / math.log(2) / target_bytes > m["bpb"] * 1.001


def test_validation_during_training_scores_like_slm_eval(run_dir, data_dir):
    """The last val_bpb in metrics.jsonl is evaluate_tokens on the same batches of the same weights."""
    import json

    from slmkit.checkpoint import load_run
    from slmkit.data import open_split

    model, tok, _ = load_run(run_dir, which="last")
    last = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "val_bpb" in r][-1]
    m = evaluate_tokens(model, np.asarray(open_split(data_dir, "val")), tok.token_byte_lengths(), batch_size=8,
                        max_batches=2)  # TINY: train.batch_size=8, train.eval_batches=2
    assert last["val_loss"] == pytest.approx(m["loss"], rel=1e-5)
    assert last["val_bpb"] == pytest.approx(m["bpb"], rel=1e-5)


def test_eval_run_on_data_and_on_text(run_dir, data_dir, corpus_file):
    on_data = evaluate_run(run_dir, data_dir=data_dir)
    on_text = evaluate_run(run_dir, input_path=str(corpus_file))
    for m in (on_data, on_text):
        assert 0 < m["loss"] < math.log(300) and m["bpb"] > 0 and 0 < m["accuracy"] <= 1
        assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))


def test_eval_needs_exactly_one_source(run_dir, data_dir):
    with pytest.raises(SlmError, match="exactly one"):
        evaluate_run(run_dir)
