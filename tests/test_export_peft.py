"""LoRA adapters in PEFT's format (slmkit.export.peft): ``peft.PeftModel`` on the HF export of the
base computes the logits of slmkit's unmerged LoRA model, for GPT-2- and Llama-shaped models."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from slmkit.errors import SlmError
from slmkit.export import export_hf
from slmkit.export.peft import PEFT_CONFIG, PEFT_WEIGHTS, export_peft, peft_adapter, write_peft
from slmkit.lora import LoRAConfig, adapter_state, apply_lora, merge_lora

from export_models import GPT2, LLAMA, random_model, tok  # noqa: F401 - tok is a fixture

try:
    import peft
    import transformers
except ImportError as e:  # the export extra (pip install 'slmkit[export]') brings both
    peft = transformers = None
    MISSING = f"PEFT parity needs peft and transformers ({e})"

needs_peft = pytest.mark.skipif(peft is None, reason=MISSING if peft is None else "")

# (model variant, LoRA config): both architectures, GQA, tied and untied heads, a subset of targets
CASES = {
    "gpt2-bias-tied-all": (dict(**GPT2, bias=True), LoRAConfig(rank=4, alpha=8, targets=["qkv", "proj", "up", "down", "head"])),
    "gpt2-untied-proj-down": (dict(**GPT2, tie_embeddings=False), LoRAConfig(rank=2, alpha=3, targets=["proj", "down"])),
    "llama-gqa-tied-all-rslora": (dict(**LLAMA, n_kv_head=2),
                                  LoRAConfig(rank=4, alpha=4, targets=["qkv", "proj", "up", "down", "head"], rslora=True)),
    "llama-gqa-untied-bias-qkv-up": (dict(**LLAMA, n_kv_head=1, bias=True, tie_embeddings=False),
                                     LoRAConfig(rank=3, alpha=6, targets=["qkv", "up"], dropout=0.1)),
}


def trained_lora(vocab: int, model_kw: dict, cfg: LoRAConfig):
    """A random base, its adapters trained a few AdamW steps (so B != 0), in eval mode."""
    model = random_model(vocab, **model_kw)
    base = random_model(vocab, **model_kw)  # the same seed: the base as exported
    apply_lora(model, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    x = torch.randint(0, vocab, (4, 32), generator=torch.Generator().manual_seed(3))
    model.train()
    for _ in range(5):
        _, loss = model(x[:, :-1], x[:, 1:], return_logits=False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval(), base


@needs_peft
@pytest.mark.parametrize("case", CASES)
def test_peft_load_matches(tmp_path, tok, case):
    model_kw, cfg = CASES[case]
    model, base = trained_lora(tok.vocab_size, model_kw, cfg)
    hf_dir = export_hf(base, tok, tmp_path / "hf")
    out = export_peft(model, tmp_path / "peft", cfg, base_model=str(hf_dir))
    assert {PEFT_CONFIG, PEFT_WEIGHTS} <= {p.name for p in out.iterdir()}
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    x = torch.randint(0, tok.vocab_size, (2, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base_logits = hf(x).logits
    with warnings.catch_warnings():  # PEFT warns about adapters on a tied head and GPT-2's Linear head
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(hf, out).eval()
    assert peft_model.peft_config["default"].r == cfg.rank
    with torch.no_grad():
        ours, theirs = model(x)[0], peft_model(x).logits
    moved = (ours - base_logits).abs().max().item()
    assert moved > 0.05, moved  # the adapters change the logits: the match below is not the base's
    diff = (theirs - ours).abs().max().item()
    assert diff < 1e-5, diff
    # PEFT holds exactly the tensors written, each loaded (none left at its own init)
    _, written = peft_adapter(adapter_state(model), cfg, model.config)
    loaded = {k.replace(".default.", "."): v for k, v in peft_model.state_dict().items() if ".lora_" in k}
    assert loaded.keys() == written.keys()
    assert all(torch.equal(loaded[k], v) for k, v in written.items())


@needs_peft
def test_peft_merge_equals_slmkit_merge(tmp_path, tok):
    """Merging on either side gives the same model: PEFT's merge_and_unload and merge_lora."""
    model_kw, cfg = CASES["llama-gqa-untied-bias-qkv-up"]
    model, base = trained_lora(tok.vocab_size, model_kw, cfg)
    hf_dir = export_hf(base, tok, tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(hf_dir), export_peft(model, tmp_path / "peft")).eval()
        merged_hf = peft_model.merge_and_unload()
    x = torch.randint(0, tok.vocab_size, (2, 32), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (merged_hf(x).logits - merge_lora(model)(x)[0]).abs().max().item() < 1e-5


def test_fused_adapters_become_shared_A_split_B(tok):
    """Llama: our qkv adapter is q/k/v adapters sharing A with B cut by rows (GQA sizes), our up
    adapter gate/up; GPT-2 keeps one Conv1D adapter each, with fan_in_fan_out."""
    model_kw, cfg = CASES["llama-gqa-tied-all-rslora"]
    model = apply_lora(random_model(tok.vocab_size, **model_kw), cfg)
    tensors = adapter_state(model)
    config, peft_tensors = peft_adapter(tensors, cfg, model.config)
    c = model.config
    q, kv = c.n_head * c.head_dim, c.kv_heads * c.head_dim
    a, b = tensors["blocks.1.attn.qkv.lora_A"], tensors["blocks.1.attn.qkv.lora_B"]
    pre = "base_model.model.model.layers.1"
    for name, rows in [("q_proj", slice(0, q)), ("k_proj", slice(q, q + kv)), ("v_proj", slice(q + kv, q + 2 * kv))]:
        assert torch.equal(peft_tensors[f"{pre}.self_attn.{name}.lora_A.weight"], a)
        assert torch.equal(peft_tensors[f"{pre}.self_attn.{name}.lora_B.weight"], b[rows])
    up_b = tensors["blocks.1.mlp.up.lora_B"]
    assert torch.equal(peft_tensors[f"{pre}.mlp.gate_proj.lora_B.weight"], up_b[: c.hidden_dim])
    assert torch.equal(peft_tensors[f"{pre}.mlp.up_proj.lora_B.weight"], up_b[c.hidden_dim:])
    assert torch.equal(peft_tensors["base_model.model.lm_head.lora_A.weight"], tensors["lm_head.lora_A"])
    assert len(peft_tensors) == 2 * c.n_layer * (3 + 1 + 2 + 1) + 2
    assert config["target_modules"] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "lm_head"]
    assert config["use_rslora"] and config["r"] == 4 and config["lora_alpha"] == 4 and not config["fan_in_fan_out"]

    model_kw, cfg = CASES["gpt2-untied-proj-down"]
    model = apply_lora(random_model(tok.vocab_size, **model_kw), cfg)
    config, peft_tensors = peft_adapter(adapter_state(model), cfg, model.config)
    assert config["target_modules"] == ["attn.c_proj", "mlp.c_proj"] and config["fan_in_fan_out"]
    assert sorted(peft_tensors) == sorted(f"base_model.model.transformer.h.{i}.{m}.lora_{x}.weight"
                                          for i in range(2) for m in ("attn.c_proj", "mlp.c_proj") for x in "AB")


def test_peft_export_refuses(tmp_path, tok):
    plain = random_model(tok.vocab_size, **LLAMA)
    with pytest.raises(SlmError, match="no LoRA adapters"):
        export_peft(plain, tmp_path / "a")
    odd = apply_lora(random_model(tok.vocab_size, norm="layernorm", positions="rope", activation="gelu"), LoRAConfig())
    with pytest.raises(SlmError, match="no standard Hugging Face architecture"):
        export_peft(odd, tmp_path / "b")
    model = apply_lora(random_model(tok.vocab_size, **LLAMA), LoRAConfig(targets=["qkv"]))
    tensors = adapter_state(model)
    del tensors["blocks.0.attn.qkv.lora_B"]
    with pytest.raises(SlmError, match="lacks blocks.0.attn.qkv.lora_B"):
        write_peft(tmp_path / "c", tensors, LoRAConfig(targets=["qkv"]), model.config)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SlmError, match="not an earlier slmkit export"):
        export_peft(model, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert not any((tmp_path / n).exists() for n in "abc")
    # an earlier export is replaced
    first = export_peft(model, tmp_path / "d")
    assert json.loads((first / PEFT_CONFIG).read_text())["target_modules"] == ["self_attn.q_proj", "self_attn.k_proj",
                                                                              "self_attn.v_proj"]
    export_peft(apply_lora(random_model(tok.vocab_size, **LLAMA), LoRAConfig(targets=["down"])), tmp_path / "d")
    assert json.loads((first / PEFT_CONFIG).read_text())["target_modules"] == ["mlp.down_proj"]
