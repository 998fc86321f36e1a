import pytest
import torch

from slmkit.errors import SlmError
from slmkit.model import GPT, ModelConfig

VARIANTS = [
    dict(),
    dict(positions="learned", norm="layernorm", activation="gelu", bias=True, tie_embeddings=False),
    dict(n_kv_head=1),
    dict(n_kv_head=2, positions="learned", dropout=0.1),
]


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("kw", VARIANTS)
def test_shapes_and_causality(kw):
    torch.manual_seed(0)
    model = GPT(small(**kw)).eval()
    x = torch.randint(0, 50, (3, 16))
    logits, loss = model(x)
    assert logits.shape == (3, 16, 50) and loss is None
    # Changing a future token must not change earlier logits.
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % 50
    logits2, _ = model(x2)
    assert torch.allclose(logits[:, :10], logits2[:, :10], atol=1e-5)
    assert not torch.allclose(logits[:, 10:], logits2[:, 10:])
    last, _ = model(x, last_only=True)
    assert last.shape == (3, 1, 50) and torch.allclose(last, logits[:, -1:], atol=1e-6)


@pytest.mark.parametrize("kw", VARIANTS[:3])
def test_overfits_one_batch(kw):
    torch.manual_seed(0)
    model = GPT(small(**kw))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 50, (4, 16))
    losses = []
    for _ in range(60):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 3.5  # about ln(50) = 3.9 at init
    assert losses[-1] < 0.5 * losses[0]


def test_init_statistics_and_tying():
    torch.manual_seed(0)
    model = GPT(small(n_layer=4, n_embd=64))
    assert model.lm_head.weight is model.tok_emb.weight
    std = model.blocks[0].attn.qkv.weight.std().item()
    assert abs(std - 0.02) < 0.002
    proj = model.blocks[0].attn.proj.weight.std().item()
    assert abs(proj - 0.02 / (2 * 4) ** 0.5) < 0.001
    untied = GPT(small(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_gqa_has_fewer_parameters():
    assert GPT(small(n_kv_head=1)).num_params() < GPT(small()).num_params()


def test_swiglu_hidden_size_rule():
    assert small(n_embd=288).hidden_dim == 768  # llama2.c's stories15M
    assert small(activation="gelu").hidden_dim == 128


@pytest.mark.parametrize("kw, msg", [
    (dict(n_head=5), "does not divide"),
    (dict(n_kv_head=3), "must divide"),
    (dict(dropout=1.5), "dropout"),
    (dict(n_layer=0), "n_layer"),
])
def test_invalid_configs(kw, msg):
    with pytest.raises(SlmError, match=msg):
        small(**kw).validate()


def test_too_long_input_is_refused():
    model = GPT(small())
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 17, dtype=torch.long))
