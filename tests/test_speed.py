"""The fast training path: the fused chunked head + cross-entropy, torch.compile, MFU in the summary."""

import json

import pytest
import torch
import torch.nn.functional as F

from slmkit.checkpoint import load_run
from slmkit.model import GPT, ChunkedCrossEntropy, ModelConfig
from slmkit.runtime import can_compile
from slmkit.train import train

from conftest import TINY


def test_chunked_cross_entropy_matches_the_plain_loss_and_gradients():
    torch.manual_seed(0)
    h = torch.randn(100, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (100,))
    t[::7] = -1  # ignored positions
    fused = ChunkedCrossEntropy.apply(h, w, t, 13)  # chunks that do not divide the rows
    plain = F.cross_entropy(h @ w.t(), t, ignore_index=-1)
    assert fused.item() == pytest.approx(plain.item(), rel=1e-12)
    for a, b in zip(torch.autograd.grad(fused, (h, w)), torch.autograd.grad(plain, (h, w))):
        assert torch.allclose(a, b, atol=1e-12)
    h2, w2 = h[:9, :4].detach().requires_grad_(), w[:7, :4].detach().requires_grad_()
    t2 = t[:9].clamp(max=6)
    assert torch.autograd.gradcheck(lambda h, w: ChunkedCrossEntropy.apply(h, w, t2, 4), (h2, w2), fast_mode=True)


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=False, positions="learned", activation="gelu")])
def test_training_forward_gives_the_same_loss_and_gradients(kw):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=60, block_size=16, n_layer=2, n_head=2, n_embd=16, **kw))
    x, y = torch.randint(0, 60, (4, 16)), torch.randint(0, 60, (4, 16))
    logits, a = model(x, y)
    assert logits.shape == (4, 16, 60)  # forward(idx, targets) is unchanged
    ga = torch.autograd.grad(a, list(model.parameters()))
    none, b = model(x, y, return_logits=False)
    gb = torch.autograd.grad(b, list(model.parameters()))
    assert none is None and b.item() == pytest.approx(a.item(), rel=1e-6)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(ga, gb))
    with torch.no_grad():  # without autograd the plain path runs, logits included
        logits, c = model(x, y, return_logits=False)
    assert logits is not None and c.item() == pytest.approx(a.item(), rel=1e-6)


def test_chunked_loss_under_bf16_autocast_is_close():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=60, block_size=16, n_layer=1, n_head=2, n_embd=16))
    x, y = torch.randint(0, 60, (2, 16)), torch.randint(0, 60, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, a = model(x, y)
        _, b = model(x, y, return_logits=False)
    assert b.dtype == torch.float32 and b.item() == pytest.approx(a.item(), rel=1e-2)
    b.backward()
    assert model.lm_head.weight.grad.dtype == torch.float32


def test_summary_reports_mfu(data_dir, tmp_path):
    s = train(data_dir, tmp_path / "r", overrides=TINY + ["train.max_steps=3"], quiet=True)
    model, _, _ = load_run(tmp_path / "r")
    assert 0 < s["mfu"] < 1 and s["peak_flops"] > 0
    # MFU is the model's FLOPs at the run's speed over the peak, with the model's own FLOP count.
    assert s["mfu"] == pytest.approx(model.flops_per_token() * s["tok_per_s"] / s["peak_flops"], rel=1e-9)


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.slow
@pytest.mark.skipif(can_compile("cpu") is not None, reason="torch.compile needs a C++ compiler on CPU")
def test_compiled_training_follows_the_eager_curve(data_dir, tmp_path):
    """Step by step the compiled run's training loss is the eager one's (fp32, no dropout: only the
    kernels' rounding differs, measured ~1e-7 here), and both learn: a compiled path with wrong
    gradients, or one that does not update the weights, fails. Compilation takes most of the time,
    so 30 steps cost little more than 4."""
    from torch._dynamo.utils import counters

    over = ["model.block_size=16", "model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.dropout=0", "train.dtype=float32",
            "train.batch_size=8", "train.max_steps=30", "train.lr=1e-2", "train.warmup_steps=3",
            "train.log_interval=1", "train.eval_interval=1000", "train.eval_batches=2", "train.plot=false"]
    eager = train(data_dir, tmp_path / "eager", overrides=over, quiet=True)
    torch._dynamo.reset()
    counters.clear()
    compiled = train(data_dir, tmp_path / "compiled", overrides=over + ["train.compile=true"], quiet=True)
    assert counters["stats"]["unique_graphs"] >= 1  # the training forward really ran through torch.compile
    a, b = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(a) == len(b) == 30
    assert b == pytest.approx(a, rel=1e-4)
    assert max(b[-5:]) < b[0] - 1.5  # ln(300) = 5.7 at the start; ~3.65 after 30 steps
    # Evaluation runs the plain model on the weights that the compiled steps trained.
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-4) and compiled["val_loss"] < b[0] - 1.5
