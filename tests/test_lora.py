"""LoRA adapters (slmkit.lora): a fresh adapter changes nothing, only adapters train, merging is
exact to float32 rounding and brings the fast decoders back, the adapter file round-trips, and
bad files are one line each."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn as nn

from slmkit import decode
from slmkit.config import add_section_arguments, from_dict, section_from_args
from slmkit.errors import SlmError
from slmkit.files import sha256_file
from slmkit.lora import (
    ADAPTER_META, ADAPTER_WEIGHTS, TARGETS, LoRAConfig, LoRALinear, adapter_state, apply_lora, check_base, describe,
    load_adapter, lora_modules, merge_lora, read_adapter, save_adapter, trainable_parameters,
)
from slmkit.model import GPT, ModelConfig

VARIANTS = {
    "gpt2-tied-bias": dict(norm="layernorm", positions="learned", activation="gelu", bias=True),
    "llama-gqa-tied": dict(norm="rmsnorm", positions="rope", activation="swiglu", n_kv_head=2),
    "llama-untied": dict(norm="rmsnorm", positions="rope", activation="swiglu", tie_embeddings=False),
}
ALL = list(TARGETS)


def tiny(variant: str, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=96, block_size=16, n_layer=2, n_head=4, n_embd=32, **VARIANTS[variant])
    return GPT(ModelConfig(**{**cfg, **kw})).eval()


def tokens(seed: int = 1, B: int = 3) -> torch.Tensor:
    return torch.randint(0, 96, (B, 16), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model: GPT, std: float = 0.05) -> None:
    """B != 0, as after training, so that merges and files are tested on adapters that matter."""
    torch.manual_seed(7)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.normal_(0.0, std)


def train_adapters(model: GPT, steps: int = 4, lr: float = 1e-2) -> None:
    """A few AdamW steps on the fused training loss (the Trainer's path: return_logits=False)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    x = tokens(2, B=4)
    model.train()
    for _ in range(steps):
        _, loss = model(x[:, :-1], x[:, 1:], return_logits=False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_fresh_adapter_leaves_logits_unchanged(variant):
    model = tiny(variant)
    x = tokens()
    with torch.no_grad():
        before, loss_before = model(x, x)
    apply_lora(model, LoRAConfig(rank=4, targets=ALL))
    with torch.no_grad():
        after, loss_after = model(x, x)
    assert torch.equal(before, after) and torch.equal(loss_before, loss_after)
    # the fused loss reads lm_head.weight: W + scale * 0 A is W exactly
    assert torch.equal(model.lm_head.weight, model.tok_emb.weight if model.config.tie_embeddings else model.lm_head.base.weight)
    c = model.config
    qkv_out = (c.n_head + 2 * c.kv_heads) * c.head_dim
    up_out = c.hidden_dim * (2 if c.activation == "swiglu" else 1)
    per_block = (c.n_embd + qkv_out) + (c.n_embd + c.n_embd) + (c.n_embd + up_out) + (c.hidden_dim + c.n_embd)
    assert trainable_parameters(model) == 4 * (c.n_layer * per_block + c.n_embd + c.vocab_size)
    assert f"{trainable_parameters(model):,} trainable parameters" in describe(model)


@pytest.mark.parametrize("variant", ["gpt2-tied-bias", "llama-gqa-tied"])
def test_only_adapters_train(variant):
    model = tiny(variant)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    x = tokens()
    with torch.no_grad():
        start = model(x)[0]
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=ALL, dropout=0.1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    # one backward: gradients reach the adapters' B (A's is zero while B is), nothing else
    _, loss = model(x[:, :-1], x[:, 1:], return_logits=False)
    loss.backward()
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            assert p.grad is not None and p.grad.abs().max() > 0, name
        elif not name.endswith("lora_A"):
            assert p.grad is None, name
    model.zero_grad(set_to_none=True)
    train_adapters(model)
    with torch.no_grad():
        moved = (model(x)[0] - start).abs().max().item()
    assert moved > 0.05, moved  # the adapters learned something, the head one included
    assert model.lm_head.lora_B.abs().max() > 0
    after = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert after.keys() == base.keys()
    for k, v in base.items():
        assert torch.equal(after[k], v), k  # bit-identical base, the tied embedding included


@pytest.mark.parametrize("variant", VARIANTS)
def test_merged_equals_unmerged_and_decodes_fast(variant):
    model = tiny(variant)
    emb = model.tok_emb.weight.clone()
    apply_lora(model, LoRAConfig(rank=4, targets=ALL, rslora=True))
    randomize_adapters(model)
    assert decode.pick(model) is decode.ModuleDecoder  # a wrapped linear: only the reference runs it
    assert not decode.reads_float_weights(model)
    x = tokens()
    with torch.no_grad():
        unmerged = model(x)[0]
        base_out = model.lm_head.base(model.hidden(x))  # the same hidden states, base head only
    assert (unmerged - base_out).abs().max() > 0.05  # the head adapter matters
    merged_model = merge_lora(model)
    assert merged_model is model and not list(lora_modules(model))
    linears = [model.lm_head] + [m for b in model.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.up, b.mlp.down)]
    assert all(type(m) is nn.Linear for m in linears)
    fast_cpu = decode.NativeDecoder if decode.NativeDecoder.supports(model) else decode.CPUDecoder
    assert decode.reads_float_weights(model) and decode.pick(model) is fast_cpu
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        merged = model(x)[0]
    diff = (merged - unmerged).abs().max().item()
    # float32 rounding of a sum of ~n_embd products per layer, through 2 layers: ~1e-6 for logits of size ~1
    assert diff < 5e-6 * max(1.0, unmerged.abs().max().item()), diff
    assert torch.equal(model.tok_emb.weight, emb)  # the head's update went to the head only
    assert model.config.tie_embeddings is False and model.lm_head.weight is not model.tok_emb.weight
    # and the fast decoder's steps on the merged model give the unmerged model's logits
    bound = 5e-6 * max(1.0, unmerged.abs().max().item())
    with torch.inference_mode():
        decoder, cache = decode.make_decoder(model), decode.KVCache.empty(model.config, x.shape[0])
        assert type(decoder) is fast_cpu
        assert (decoder.prefill(x[:, :8], cache) - unmerged[:, 7]).abs().max() < bound
        for t in range(8, 16):
            assert (decoder.step(x[:, t], cache) - unmerged[:, t]).abs().max() < bound, t


def test_merge_without_head_keeps_embeddings_tied():
    model = tiny("llama-gqa-tied")
    apply_lora(model, LoRAConfig(rank=2, targets=["qkv", "down"]))
    randomize_adapters(model)
    merge_lora(model)
    assert model.config.tie_embeddings and model.lm_head.weight is model.tok_emb.weight


@pytest.mark.parametrize("rslora", [False, True])
def test_scale_and_forward_by_hand(rslora):
    cfg = LoRAConfig(rank=4, alpha=8, rslora=rslora)
    assert cfg.scale == (8 / math.sqrt(4) if rslora else 8 / 4)
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    lora = LoRALinear(base, cfg.rank, cfg.scale)
    bound = 1 / math.sqrt(6)  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in)), as nn.Linear and PEFT
    assert lora.lora_A.abs().max() <= bound and lora.lora_A.abs().max() > bound / 2
    assert torch.equal(lora.lora_B, torch.zeros(5, 4))
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(3, 6)
    by_hand = x @ base.weight.t() + base.bias + cfg.scale * (x @ lora.lora_A.t() @ lora.lora_B.t())
    assert torch.allclose(lora(x), by_hand, atol=1e-6, rtol=0)
    ratio = (lora(x) - base(x)).norm() / (x @ lora.lora_A.t() @ lora.lora_B.t()).norm()
    assert abs(ratio.item() - (4.0 if rslora else 2.0)) < 1e-5


def test_dropout_only_in_training():
    model = tiny("llama-untied")
    apply_lora(model, LoRAConfig(rank=4, dropout=0.5))
    randomize_adapters(model)
    x = tokens()
    with torch.no_grad():
        a, b = model(x)[0], model(x)[0]
        model.train()
        c = model(x)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_save_read_round_trip(tmp_path):
    model = tiny("llama-gqa-tied")
    cfg = LoRAConfig(rank=4, alpha=4, targets=["qkv", "up", "head"], dropout=0.1, rslora=True)
    apply_lora(model, cfg)
    train_adapters(model)
    base_ckpt = tmp_path / "base" / "best"
    base_ckpt.mkdir(parents=True)
    from safetensors.torch import save_file

    base_weights = tiny("llama-gqa-tied").state_dict()
    base_weights.pop("lm_head.weight")  # tied: stored once, as checkpoints do
    save_file(base_weights, base_ckpt / "model.safetensors")
    out = save_adapter(tmp_path / "adapter", model, cfg, base=base_ckpt)
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_META, ADAPTER_WEIGHTS]
    n_adapter = trainable_parameters(model)
    assert (out / ADAPTER_WEIGHTS).stat().st_size < 4 * n_adapter + 2048  # the adapters alone, float32
    adapter = read_adapter(out)
    assert adapter.config == cfg and adapter.model["n_kv_head"] == 2
    assert adapter.base == {"path": str(base_ckpt.resolve()), "sha256": sha256_file(base_ckpt / "model.safetensors")}
    saved = adapter_state(model)
    assert adapter.tensors.keys() == saved.keys() and all(torch.equal(adapter.tensors[k], v) for k, v in saved.items())
    check_base(adapter, base_ckpt)
    fresh = load_adapter(tiny("llama-gqa-tied"), adapter.tensors, adapter.config, source=adapter.weights_file)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(fresh(x)[0], model(x)[0])
    assert describe(fresh) == describe(model)


def test_check_base_refuses_other_weights(tmp_path):
    from safetensors.torch import save_file

    model = apply_lora(tiny("llama-untied"), LoRAConfig(rank=2))
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    save_file({"w": torch.zeros(2)}, tmp_path / "a" / "model.safetensors")
    save_file({"w": torch.ones(2)}, tmp_path / "b" / "model.safetensors")
    adapter = read_adapter(save_adapter(tmp_path / "adapter", model, LoRAConfig(rank=2), base=tmp_path / "a"))
    check_base(adapter, tmp_path / "a")
    with pytest.raises(SlmError, match="was trained on the base .* holds other weights"):
        check_base(adapter, tmp_path / "b")
    with pytest.raises(SlmError, match="has no model.safetensors"):
        check_base(adapter, tmp_path / "missing")
    with pytest.raises(SlmError, match="has no model.safetensors"):
        save_adapter(tmp_path / "adapter2", model, LoRAConfig(rank=2), base=tmp_path / "nowhere")
    assert not (tmp_path / "adapter2").exists()


def one_line(e: pytest.ExceptionInfo, *parts: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, msg


def test_bad_adapter_files(tmp_path):
    cfg = LoRAConfig(rank=4)
    model = apply_lora(tiny("llama-untied"), cfg)
    out = save_adapter(tmp_path / "adapter", model, cfg)
    adapter = read_adapter(out)
    weights = out / ADAPTER_WEIGHTS
    # a wider base model: the shapes do not fit, and the file is named
    with pytest.raises(SlmError) as e:
        load_adapter(tiny("llama-untied", n_embd=48), adapter.tensors, cfg, source=weights)
    one_line(e, str(weights), "blocks.0.attn.qkv.lora_A", "(4, 32)", "(4, 48)")
    # a missing tensor
    tensors = dict(adapter.tensors)
    del tensors["blocks.1.mlp.down.lora_B"]
    with pytest.raises(SlmError) as e:
        load_adapter(tiny("llama-untied"), tensors, cfg, source=weights)
    one_line(e, str(weights), "lacks the tensor blocks.1.mlp.down.lora_B")
    # tensors the config does not target
    with pytest.raises(SlmError) as e:
        load_adapter(tiny("llama-untied"), {**adapter.tensors, "lm_head.lora_A": torch.zeros(4, 32)}, cfg, source=weights)
    one_line(e, str(weights), "lm_head.lora_A")
    # an unknown target in adapter.json
    meta = json.loads((out / ADAPTER_META).read_text())
    meta["lora"]["targets"] = ["qkv", "gate"]
    (out / ADAPTER_META).write_text(json.dumps(meta))
    with pytest.raises(SlmError) as e:
        read_adapter(out)
    one_line(e, str(out / ADAPTER_META), "'gate'", "qkv")
    # not JSON, not ours, no weights, corrupt weights, no folder
    (out / ADAPTER_META).write_text("{oops")
    with pytest.raises(SlmError) as e:
        read_adapter(out)
    one_line(e, str(out / ADAPTER_META), "JSON")
    (out / ADAPTER_META).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(SlmError) as e:
        read_adapter(out)
    one_line(e, "not a slmkit LoRA adapter")
    meta["lora"]["targets"] = ["qkv"]
    (out / ADAPTER_META).write_text(json.dumps(meta))
    weights.write_bytes(b"\x00" * 20)
    with pytest.raises(SlmError) as e:
        read_adapter(out)
    one_line(e, str(weights), "safetensors")
    weights.unlink()
    with pytest.raises(SlmError) as e:
        read_adapter(out)
    one_line(e, ADAPTER_WEIGHTS, "incomplete")
    with pytest.raises(SlmError) as e:
        read_adapter(tmp_path / "nothing")
    one_line(e, str(tmp_path / "nothing"), ADAPTER_META)


@pytest.mark.parametrize("bad, message", [
    (dict(rank=0), "lora.rank must be a positive integer"),
    (dict(alpha=0.0), "lora.alpha must be a positive number"),
    (dict(alpha=float("nan")), "lora.alpha must be a positive number"),
    (dict(dropout=1.0), "lora.dropout must be in [0, 1)"),
    (dict(targets=[]), "lora.targets is empty"),
    (dict(targets=["qkv", "attn"]), "unknown target 'attn'"),
    (dict(targets=["qkv", "qkv"]), "lists a target twice"),
])
def test_config_refuses_bad_values(bad, message):
    with pytest.raises(SlmError) as e:
        LoRAConfig(**bad).validate()
    one_line(e, message)
    with pytest.raises(SlmError):
        apply_lora(tiny("llama-untied"), LoRAConfig(**bad))


def test_config_from_toml_and_flags():
    assert from_dict(LoRAConfig, {"rank": 16, "targets": ["qkv", "head"], "rslora": True}, "lora") == \
        LoRAConfig(rank=16, targets=["qkv", "head"], rslora=True)
    with pytest.raises(SlmError, match=r"did you mean lora.rank\?"):
        from_dict(LoRAConfig, {"rnak": 4}, "lora")
    with pytest.raises(SlmError, match="lora.targets = 'gate' is not allowed"):
        from_dict(LoRAConfig, {"targets": ["gate"]}, "lora")
    parser = argparse.ArgumentParser()
    add_section_arguments(parser, LoRAConfig)
    args = parser.parse_args(["--lora-rank", "4", "--lora-alpha", "32", "--lora-targets", "qkv", "down", "head", "--rslora"])
    cfg = section_from_args(LoRAConfig, args, "lora", {"dropout": 0.05, "rank": 2})
    assert cfg == LoRAConfig(rank=4, alpha=32.0, dropout=0.05, targets=["qkv", "down", "head"], rslora=True)


def test_apply_twice_is_refused():
    model = apply_lora(tiny("llama-untied"), LoRAConfig(rank=2))
    with pytest.raises(SlmError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig(rank=2))
