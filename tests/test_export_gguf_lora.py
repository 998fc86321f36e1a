"""A LoRA run in llama.cpp, judged by llama.cpp itself (llama-cpp-python): ``base.gguf`` with
``--lora adapter.gguf`` computes slmkit's LoRA model (adapters on the fused QKV and SwiGLU up, GQA,
rsLoRA, a head adapter on tied and untied heads, GPT-2 and Llama), the merged GGUF computes it too,
and ``--format run`` writes it merged as a plain run with the same logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slmkit.chat import render_prompt
from slmkit.checkpoint import load_run
from slmkit.errors import SlmError
from slmkit.export.gguf import export_gguf_adapter, export_gguf_lora, gguf_lora_tensors
from slmkit.finetune import finetune
from slmkit.lora import LoRAConfig, apply_lora, merge_lora

from export_models import GPT2, LLAMA, one_error_line, random_model, slm, tok  # noqa: F401 - tok is a fixture
from test_export_gguf import ggml_activation, llama_cpp, llama_cpp_logits, load  # noqa: F401 - a fixture
from test_finetune import FAST, qa  # noqa: F401 - qa is a fixture

gguf = pytest.importorskip("gguf")

CASES = {  # model variant, LoRA config
    "llama-gqa-untied-bias-rslora-all": (dict(**LLAMA, n_kv_head=2, bias=True, tie_embeddings=False),
                                         LoRAConfig(rank=4, alpha=6, rslora=True,
                                                    targets=["qkv", "proj", "up", "down", "head"])),
    "llama-tied-head": (dict(**LLAMA), LoRAConfig(rank=2, alpha=4, targets=["qkv", "head"])),
    "gpt2-bias": (dict(**GPT2, bias=True), LoRAConfig(rank=3, alpha=3, targets=["qkv", "proj", "up", "down"])),
}


def trained_lora(vocab: int, model_kw: dict, cfg: LoRAConfig):
    """A random base with adapters trained a few AdamW steps (so every B is non-zero), eval mode."""
    model = apply_lora(random_model(vocab, **model_kw), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    x = torch.randint(0, vocab, (4, 32), generator=torch.Generator().manual_seed(3))
    for _ in range(5):
        _, loss = model(x[:, :-1], x[:, 1:], return_logits=False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


@pytest.mark.parametrize("case", CASES)
def test_llama_cpp_with_the_adapter_is_slmkits_lora_model(case, tok, tmp_path, ggml_activation):
    model_kw, cfg = CASES[case]
    model = trained_lora(tok.vocab_size, model_kw, cfg)
    out = export_gguf_lora(model, tok, tmp_path / "x")
    assert sorted(p.name for p in out.iterdir()) == ["adapter.gguf", "base.gguf", "slmkit_export.json"]
    ids = [tok.eot_id, *tok.encode("Once upon a time, Tom had a red ball and Lily")][:32]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].numpy()
    theirs = llama_cpp_logits(load(out / "base.gguf", lora_path=str(out / "adapter.gguf")), ids)
    bare = llama_cpp_logits(load(out / "base.gguf"), ids)
    moved = np.abs(bare - ours).max()
    assert moved > 0.05, moved  # the adapters change the logits: the match below is not the base's
    tolerance = 1e-4 if case.startswith("llama") else 3e-4  # gpt2: ggml's float16 GELU table, see test_export_gguf
    assert np.abs(theirs - ours).max() < tolerance * max(1.0, np.abs(ours).max()), np.abs(theirs - ours).max()
    reader = gguf.GGUFReader(str(out / "adapter.gguf"))
    fields = {k: reader.fields[k] for k in ("general.type", "adapter.type", "adapter.lora.alpha")}
    assert bytes(fields["general.type"].parts[-1]).decode() == "adapter"
    assert float(fields["adapter.lora.alpha"].parts[-1][0]) == pytest.approx(cfg.scale * cfg.rank)


def test_adapter_tensors_are_cut_and_permuted_as_the_weights():
    """llama: one qkv adapter is q/k/v adapters sharing A, B's rows split (GQA sizes) and the q/k
    rows rotary-permuted exactly as the base's weights; up is gate + up."""
    from slmkit.export.common import interleave_rope_rows
    from slmkit.export.gguf import gguf_tensors

    model = trained_lora(64, dict(**LLAMA, n_kv_head=2), LoRAConfig(rank=2, targets=["qkv", "up"]))
    t = gguf_lora_tensors(model)
    m = model.blocks[1].attn.qkv
    a, b, w = m.lora_A.detach(), m.lora_B.detach(), m.base.weight.detach().clone()
    assert sorted(t) == sorted(f"blk.{i}.{n}.weight.lora_{x}" for i in range(2)
                               for n in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up") for x in "ab")
    assert all(torch.equal(t[f"blk.1.{n}.weight.lora_a"], a) for n in ("attn_q", "attn_k", "attn_v"))
    assert torch.equal(t["blk.1.attn_q.weight.lora_b"], interleave_rope_rows(b[:32], 4))
    assert torch.equal(t["blk.1.attn_k.weight.lora_b"], interleave_rope_rows(b[32:48], 2))
    assert torch.equal(t["blk.1.attn_v.weight.lora_b"], b[48:])
    # the same cut on the merged weight is the base export's: delta W = B A row for row
    merged = gguf_tensors(merge_lora(model))  # (in place: m.base now holds the merged weight)
    delta = (t["blk.1.attn_k.weight.lora_b"] @ t["blk.1.attn_k.weight.lora_a"]) * m.scale
    base_k = merged["blk.1.attn_k.weight"] - delta
    torch.testing.assert_close(base_k, interleave_rope_rows(w[32:48], 2), rtol=0, atol=1e-6)


def test_adapter_export_refuses(tok, tmp_path):
    plain = random_model(tok.vocab_size, **LLAMA)
    with pytest.raises(SlmError, match="no LoRA adapters"):
        export_gguf_adapter(plain, tmp_path / "a.gguf")
    tied = apply_lora(random_model(tok.vocab_size, **LLAMA), LoRAConfig(targets=["head"]))
    with pytest.raises(SlmError, match="head adapter on tied embeddings needs a base GGUF with its own output"):
        export_gguf_adapter(tied, tmp_path / "a.gguf")
    odd = apply_lora(random_model(tok.vocab_size, norm="layernorm", positions="rope", activation="gelu"), LoRAConfig())
    with pytest.raises(SlmError, match="no llama.cpp architecture"):
        export_gguf_lora(odd, tok, tmp_path / "b")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SlmError, match="not an earlier slmkit export"):
        export_gguf_lora(tied, tok, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "b").exists()


def test_chat_lora_run_in_llama_cpp_merged_adapter_and_as_a_run(qa, tmp_path, capsys):
    """slm export LORA_RUN: --format gguf-lora (base + adapter), --format gguf (merged) and
    --format run (merged RUN_DIR) all compute the run, chat-token rows included."""
    run = tmp_path / "lora"
    lora = LoRAConfig(rank=4, alpha=8, targets=["qkv", "proj", "up", "down", "head"])
    finetune(qa["base"], qa["sft"], run, lora=lora, overrides=["train.max_steps=20", "train.lr=1e-2", *FAST], quiet=True)
    ours_model, tok, _ = load_run(run)
    ids = render_prompt([("user", "What color is the sky?")], tok, tok.chat_template)
    with torch.no_grad():
        ours = ours_model(torch.tensor([ids]))[0][0].numpy()
    assert slm("export", run, "--format", "gguf-lora", "--out", tmp_path / "g") == 0
    assert slm("export", run, "--format", "gguf", "--out", tmp_path / "m.gguf") == 0
    assert slm("export", run, "--format", "run", "--out", tmp_path / "merged") == 0
    assert "as gguf-lora f32" in capsys.readouterr().out
    with_adapter = llama_cpp_logits(load(tmp_path / "g" / "base.gguf", lora_path=str(tmp_path / "g" / "adapter.gguf")), ids)
    bare = llama_cpp_logits(load(tmp_path / "g" / "base.gguf"), ids)
    merged = llama_cpp_logits(load(tmp_path / "m.gguf"), ids)
    assert np.abs(bare - ours).max() > 1e-2
    assert np.abs(with_adapter - ours).max() < 1e-4 and np.abs(merged - ours).max() < 1e-4
    # the base holds the chat tokens' rows as the run trained them (not the base run's vocabulary)
    assert load(tmp_path / "g" / "base.gguf").n_vocab() == tok.vocab_size > load_run(qa["base"])[1].vocab_size
    # the merged run: a plain run (no base needed) with the run's logits, tokenizer and template
    model2, tok2, info2 = load_run(tmp_path / "merged")
    assert "lora" not in info2 and info2["merged_from"] == str(run.resolve())
    assert tok2.chat_template == tok.chat_template
    assert not (tmp_path / "merged" / "config.toml").read_text().count("[lora]")
    with torch.no_grad():
        torch.testing.assert_close(model2(torch.tensor([ids]))[0][0], torch.from_numpy(ours), rtol=0, atol=1e-6)
    capsys.readouterr()
    one_error_line(capsys, slm("export", qa["base"], "--format", "run", "--out", tmp_path / "no"), "is not a LoRA run")
    one_error_line(capsys, slm("export", qa["base"], "--format", "gguf-lora", "--out", tmp_path / "no"), "not a LoRA run")
    one_error_line(capsys, slm("export", run, "--format", "run", "--out", tmp_path / "merged"), "merged")
    assert json.loads((tmp_path / "g" / "slmkit_export.json").read_text())["format"] == "gguf-lora"
