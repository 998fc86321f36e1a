"""Models and a tokenizer for the generation tests (test_runners, test_sampling, test_generation,
test_text, test_generate_cli).

Two kinds of model: small random GPTs (weights scaled up so that greedy text varies with the
context) for the cache and batching checks, and "scripted" GPTs whose weights are set by hand so
that the next token depends only on the last one (a bigram table): they write exactly the text a
test needs, through the real model code and every decoding path.
"""

from __future__ import annotations

import math

import pytest
import torch

from slmkit.model import GPT, ModelConfig

GREEDY = dict(temperature=0.0, stop_at_eot=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: threads only add waiting, a lot of it on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_model(seed: int = 0, scale: float = 6.0, **kw) -> GPT:
    base = dict(vocab_size=61, block_size=24, n_layer=2, n_head=4, n_embd=32)
    base.update(kw)
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**base)).eval()
    with torch.no_grad():  # larger weights: peaked, context-dependent predictions
        for p in model.parameters():
            p.mul_(scale)
    return model


def noisy_model(seed: int, **kw) -> GPT:
    """A random model with non-zero biases and uneven norm weights: every path must apply them."""
    model = random_model(seed, **kw)
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        for name, p in model.named_parameters():
            if p.ndim == 1:
                noise = torch.randn(p.shape, generator=g)
                p.copy_(6.0 * (1.0 + 0.3 * noise) if name.endswith("weight") else 0.5 * noise)
    return model


class ByteTokenizer:
    """Stand-in tokenizer: one token per byte, so every multi-byte character spans tokens."""

    eot_token = "<|endoftext|>"
    eot_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids) -> bytes:
        return b"".join(self.eot_token.encode() if i == self.eot_id else bytes([i]) for i in ids)

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


TOK = ByteTokenizer()


def bigram_model(logprobs: dict[int, dict[int, float]], vocab_size: int = 257, **kw) -> GPT:
    """A real GPT whose next-token log-probabilities depend only on the last token: attention and
    MLP write nothing, the embedding is one-hot and the head holds ``logprobs[prev][next]``
    (tokens not listed: -30)."""
    width = 8 * math.ceil(vocab_size / 8)
    base = dict(vocab_size=vocab_size, block_size=64, n_layer=1, n_head=1, n_embd=width, tie_embeddings=False)
    base.update(kw)
    model = GPT(ModelConfig(**base)).eval()
    scale = math.sqrt(width)  # RMSNorm turns a one-hot row into sqrt(width) * one-hot
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.tok_emb.weight[:, :vocab_size] = torch.eye(vocab_size)
        for module in model.modules():
            if isinstance(module, (torch.nn.RMSNorm, torch.nn.LayerNorm)):
                module.weight.fill_(1.0)
        model.lm_head.weight.fill_(-30.0 / scale)
        for prev, nexts in logprobs.items():
            for nxt, lp in nexts.items():
                model.lm_head.weight[nxt, prev] = lp / scale
    return model


def script_model(text: str, then_eot: bool = False, **kw) -> GPT:
    """A bigram GPT that, after each byte of ``text``, writes the next one (cyclically, or
    <|endoftext|> after the last byte): the bytes of ``text`` must all differ."""
    data = text.encode()
    assert len(set(data)) == len(data)
    follow = {a: b for a, b in zip(data, data[1:])}
    follow[data[-1]] = TOK.eot_id if then_eot else data[0]
    follow[TOK.eot_id] = data[0]
    return bigram_model({a: {b: 0.0} for a, b in follow.items()}, **kw)
