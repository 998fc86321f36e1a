"""Shared pieces of the export tests (test_export, test_export_hf, test_export_onnx,
test_export_torchscript, test_onnx_generate): a tokenizer, random models whose every weight
matters, greedy decoding written out by hand, and the CLI helpers."""

from __future__ import annotations

import pytest
import torch

from slmkit.cli import main
from slmkit.model import GPT, ModelConfig
from slmkit.tokenizer import train_bpe

from conftest import make_corpus

GPT2 = dict(norm="layernorm", positions="learned", activation="gelu")
LLAMA = dict(norm="rmsnorm", positions="rope", activation="swiglu")
PROMPT = "Once upon a time, Tom"


@pytest.fixture(scope="module")
def tok():
    return train_bpe(make_corpus(), 300)


def fit(model: GPT, ids: list[int], steps: int) -> GPT:
    """``steps`` AdamW steps (lr 3e-3) on random 64-token windows of ``ids``, 16 a batch; the model
    comes back in eval mode. Seed torch before building the model: the windows draw from it too."""
    data = torch.tensor(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        at = torch.randint(len(data) - 65, (16,)).tolist()
        x = torch.stack([data[i:i + 64] for i in at])
        y = torch.stack([data[i + 1:i + 65] for i in at])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def random_model(vocab: int, **kw) -> GPT:
    """A small model with every weight random (biases and norm gains too), so a wrong mapping of
    any tensor shows up in the logits, and with logits spread enough that greedy picks are clear."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=vocab, block_size=32, n_layer=2, n_head=4, n_embd=32)
    model = GPT(ModelConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.15)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    return model


@torch.no_grad()
def our_greedy(model: GPT, ids: list[int], n: int, eot: int | None, keep: int | None = None) -> list[int]:
    """Reference greedy decoding with the full forward (no cache), written out by hand: past the
    context, the window slides to its last ``keep`` tokens (slmkit's rule: block_size // 2;
    nanoGPT's is block_size - 1, re-cropped at every step)."""
    block = model.config.block_size
    keep = block // 2 if keep is None else keep
    seq, new = list(ids[-block:]), []
    for _ in range(n):
        logits, _ = model(torch.tensor([seq]))
        token = int(logits[0, -1].argmax())
        new.append(token)
        seq.append(token)
        if token == eot:
            break
        if len(seq) > block:
            seq = seq[-keep:]
    return new


def slm(*args) -> int:
    return main([str(a) for a in args])


def one_error_line(capsys, code: int, pattern: str) -> None:
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and pattern in err, err


ONNX_VARIANTS = {
    "gpt2": dict(**GPT2, bias=True),
    "llama-gqa": dict(**LLAMA, n_kv_head=2, tie_embeddings=False),
    "rope-layernorm-gelu": dict(norm="layernorm", positions="rope", activation="gelu"),  # no HF class, fine here
}

