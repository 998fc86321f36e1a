"""Hugging Face export and import (slmkit.export.hf), checked by loading with transformers and
comparing logits and greedy text with ours; import back without transformers."""

from __future__ import annotations

import pytest
import torch

from slmkit.errors import SlmError
from slmkit.export import export_hf, file_sizes, hf_architecture, hf_to_slmkit

from export_models import GPT2, LLAMA, PROMPT, our_greedy, random_model, tok  # noqa: F401 - tok is a fixture


HF_VARIANTS = {
    "gpt2-bias-tied": dict(**GPT2, bias=True),
    "gpt2-nobias-untied": dict(**GPT2, tie_embeddings=False),
    "llama-gqa-tied": dict(**LLAMA, n_kv_head=2),
    "llama-bias-untied": dict(**LLAMA, bias=True, tie_embeddings=False, mlp_hidden=48, rope_theta=500.0, norm_eps=1e-6),
}


@pytest.mark.parametrize("variant", HF_VARIANTS)
def test_hf_export_matches_transformers(tmp_path, tok, variant):
    transformers = pytest.importorskip("transformers")
    model = random_model(tok.vocab_size, **HF_VARIANTS[variant])
    out = export_hf(model, tok, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(file_sizes(out))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == ("GPT2LMHeadModel" if variant.startswith("gpt2") else "LlamaForCausalLM")
    x = torch.randint(0, tok.vocab_size, (2, 32))
    with torch.no_grad():
        assert (hf(x).logits - model(x)[0]).abs().max().item() < 1e-4
    assert hf_tok.eos_token == hf_tok.bos_token == hf_tok.pad_token == "<|endoftext|>"
    assert hf_tok.eos_token_id == tok.eot_id
    ids = hf_tok(PROMPT, return_tensors="pt").input_ids
    assert ids[0].tolist() == tok.encode(PROMPT)
    with torch.no_grad():
        gen = hf.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    ours = our_greedy(model, tok.encode(PROMPT), 12, tok.eot_id)
    assert gen == ours
    assert hf_tok.decode(gen) == tok.decode(ours)


@pytest.mark.parametrize("variant", HF_VARIANTS)
def test_hf_round_trip_without_transformers(tmp_path, tok, variant):
    model = random_model(tok.vocab_size, **HF_VARIANTS[variant])
    back, back_tok = hf_to_slmkit(export_hf(model, tok, tmp_path / "hf"))
    assert back.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert back_tok.encode(PROMPT) == tok.encode(PROMPT) and back_tok.eot_id == tok.eot_id


def test_gpt2_import_keeps_a_lone_bias(tmp_path, tok):
    model = random_model(tok.vocab_size, **GPT2, bias=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and "qkv" not in name:
                p.zero_()
    back, _ = hf_to_slmkit(export_hf(model, tok, tmp_path / "hf"))
    assert back.config.bias and torch.equal(back.blocks[0].attn.qkv.bias, model.blocks[0].attn.qkv.bias)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_import_checkpoint_saved_by_transformers(tmp_path, tok, arch):
    """A model that transformers itself wrote (its own config and weight names) imports with equal logits."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=4)
        hf = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=80,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=32, tie_word_embeddings=False)
        hf = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))  # HF initialises biases and norms to constants
    hf.eval().save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(tok.to_hf_tokenizer_json())
    ours, _ = hf_to_slmkit(tmp_path / "hf")
    x = torch.randint(0, tok.vocab_size, (2, 32))
    with torch.no_grad():
        assert (ours(x)[0] - hf(x).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("mix, pattern", [
    (dict(norm="layernorm", positions="rope", activation="gelu"), "no standard Hugging Face architecture"),
    (dict(norm="rmsnorm", positions="learned", activation="swiglu"), "no standard Hugging Face architecture"),
    (dict(norm="rmsnorm", positions="rope", activation="gelu"), "no standard Hugging Face architecture"),
    (dict(**GPT2, n_kv_head=2), "grouped-query"),
])
def test_hf_refuses_nonstandard_mixes(tmp_path, tok, mix, pattern):
    model = random_model(tok.vocab_size, **mix)
    with pytest.raises(SlmError, match=pattern):
        hf_architecture(model.config)
    with pytest.raises(SlmError, match=pattern):
        export_hf(model, tok, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("variant", ["gpt2-nobias-untied", "llama-bias-untied"])
def test_hf_export_carries_the_chat_template(tmp_path, tok, variant):
    """A chat run's export: transformers' apply_chat_template gives exactly our prompt ids, and its
    greedy generate stops at <|end|> where slmkit's reply does, with the same tokens."""
    transformers = pytest.importorskip("transformers")
    from slmkit.chat import add_chat_tokens, render_prompt
    from slmkit.generate import ChatSession, SamplingConfig, generate_tokens, reply

    chat_tok = add_chat_tokens(tok)
    model = random_model(chat_tok.vocab_size, **HF_VARIANTS[variant], block_size=64)
    session = ChatSession(chat_tok)
    turns = [("system", "Be kind."), ("user", "Who had a red ball?")]
    ids = render_prompt(turns, chat_tok, chat_tok.chat_template)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=12)
    free = generate_tokens(model, [ids], greedy, chat_tok.eot_id)[0]
    with torch.no_grad():  # make <|end|> the greedy pick after a few tokens (the head is untied)
        model.lm_head.weight[session.end_id] = 1.5 * model.lm_head.weight[free[3]]
    ours = generate_tokens(model, [ids], greedy, chat_tok.eot_id, stop_ids=session.stop_ids)[0]
    assert 0 < len(ours) < 12 and ours == free[: len(ours)]

    out = export_hf(model, chat_tok, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": role, "content": content} for role, content in turns]
    hf_ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert hf_ids == ids
    assert hf.generation_config.eos_token_id == [chat_tok.eot_id, session.end_id]
    assert hf_tok.eos_token == "<|end|>" and hf_tok.eos_token_id == session.end_id
    assert {"<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"} <= set(hf_tok.all_special_tokens)
    with torch.no_grad():
        gen = hf.generate(torch.tensor([hf_ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert gen == ours + [session.end_id]  # HF keeps the end token, slmkit's reply leaves it out
    assert hf_tok.decode(gen, skip_special_tokens=True) == reply(model, chat_tok, turns, greedy)

    _, back = hf_to_slmkit(out)  # the template comes back with an import
    assert back.chat_template == chat_tok.chat_template
