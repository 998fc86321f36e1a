"""GGUF, the file llama.cpp (and everything built on it: llama-cli, llama-server, ollama, LM Studio) runs.

``export_gguf`` writes one ``.gguf`` file with the ``gguf`` package (llama.cpp's own writer):

    architecture  Llama-flavoured models (rotary + RMSNorm + SwiGLU, GQA and biases allowed) as
                  ``llama``: separate Q/K/V, the Q and K rows permuted from slmkit's half-split
                  rotary layout to the interleaved pairs llama.cpp rotates (what its
                  convert_hf_to_gguf does to HF Llama), rope base, RMSNorm epsilon, context.
                  GPT-2-flavoured models (learned positions + LayerNorm + GELU) as ``gpt2``: fused
                  QKV, biases (zeros where the model has none: llama.cpp's gpt2 requires them).
                  Other mixes are refused: no llama.cpp architecture computes them.
    tensors       ``outtype`` f32, f16, bf16, q8_0 or q4_0 for the matrices (embedding and head
                  included); norms, biases and GPT-2's position table stay float32, as
                  convert_hf_to_gguf keeps them. q8_0/q4_0 pack rows in blocks of 32 values, so
                  every matrix row must be a multiple of 32 long: otherwise refused (llama.cpp's
                  converter would silently fall back to f16).
    tokenizer     ``tokenizer.ggml.model = gpt2`` (byte-level BPE) with pre-tokenizer ``gpt-2``:
                  both slmkit tokenizers split text with GPT-2's regex (the ``tokenizers``
                  ByteLevel pre-tokenizer's default and tiktoken's r50k pattern), which is the
                  regex llama.cpp runs for ``gpt-2``. Tokens in their byte-level spelling, merges
                  in rank order, token types (special tokens such as ``<|endoftext|>`` and the
                  chat tokens are control tokens: plain text never turns into them), bos = eos =
                  padding = ``<|endoftext|>`` and ``add_bos_token = true`` (every training
                  document follows an ``<|endoftext|>``, so a prompt starts after one, as in
                  ``slm generate``), ``<|end|>`` as the end-of-turn token and
                  ``tokenizer.chat_template`` (``chat.chat_template_jinja``) when the run carries
                  a chat template.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from slmkit.errors import SlmError
from slmkit.export.common import META_FILE, export_meta, interleave_rope_rows, output_dir, require, write_json
from slmkit.files import atomic_file
from slmkit.lora import lora_modules, strip_lora
from slmkit.model import GPT, ModelConfig

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
BLOCK = {"q8_0": 32, "q4_0": 32}  # values per quantization block (ggml's QK8_0, QK4_0)
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for GPT-2's split regex, the one our byte-level BPE uses


def gguf_architecture(config: ModelConfig) -> str:
    """``"llama"`` or ``"gpt2"``: the llama.cpp architecture that computes exactly this model;
    a one-line SlmError naming the settings when none does."""
    c = config
    if c.head_dim * c.n_head != c.n_embd:
        raise SlmError(f"cannot export to GGUF: model.head_size={c.head_size} makes the heads other than "
                       "n_embd/n_head wide (a pruned model): use --format hf, onnx or torchscript")
    if c.positions == "rope" and c.norm == "rmsnorm" and c.activation == "swiglu":
        return "llama"
    if c.positions == "learned" and c.norm == "layernorm" and c.activation == "gelu":
        return "gpt2"
    raise SlmError(
        f"cannot export to GGUF: no llama.cpp architecture computes model.positions={c.positions}, "
        f"norm={c.norm}, activation={c.activation}; it runs rope+rmsnorm+swiglu (llama) and "
        "learned+layernorm+gelu (gpt2): use --format onnx or torchscript for this model")


def linear_parts(config: ModelConfig, path: str) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """The GGUF matrices (names without ``.weight``) that our linear ``path`` (``blocks.{i}.attn.qkv``,
    ``...attn.proj``, ``...mlp.up``, ``...mlp.down``, ``lm_head``) is, each with the function that
    takes its rows from ours: a weight, a bias or a LoRA B, all cut and permuted alike. ``llama``
    splits our fused QKV into Q, K and V (Q and K rows in llama.cpp's rotary layout) and our SwiGLU
    ``up`` into gate and up; ``gpt2`` keeps both fused."""
    c = config
    if path == "lm_head":
        return [("output", lambda t: t)]
    i, rest = path.removeprefix("blocks.").split(".", 1)
    p = f"blk.{i}."
    if rest == "attn.proj":
        return [(p + "attn_output", lambda t: t)]
    if rest == "mlp.down":
        return [(p + "ffn_down", lambda t: t)]
    if gguf_architecture(c) == "gpt2":
        return [(p + {"attn.qkv": "attn_qkv", "mlp.up": "ffn_up"}[rest], lambda t: t)]
    if rest == "attn.qkv":
        q, kv = c.n_head * c.head_dim, c.kv_heads * c.head_dim
        return [(p + "attn_q", lambda t: interleave_rope_rows(t[:q], c.n_head)),
                (p + "attn_k", lambda t: interleave_rope_rows(t[q:q + kv], c.kv_heads)),
                (p + "attn_v", lambda t: t[q + kv:])]
    h = c.hidden_dim  # our SwiGLU up: the gate's rows first, then the up's
    return [(p + "ffn_gate", lambda t: t[:h]), (p + "ffn_up", lambda t: t[h:])]


def gguf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """``model``'s weights under llama.cpp's tensor names, float32, in its orientation (PyTorch's
    (out, in) is GGUF's (in, out) ``ne``), Q/K rows in llama.cpp's rotary layout for ``llama``."""
    c = model.config
    gpt2 = gguf_architecture(c) == "gpt2"
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {"token_embd.weight": sd["tok_emb.weight"]}
    if gpt2:
        out["position_embd.weight"] = sd["pos_emb.weight"]

    def put(ours: str, parts: list, width: int) -> None:
        for kind in ("weight", "bias"):
            t = sd.get(f"{ours}.{kind}")
            if t is None and kind == "bias" and gpt2:  # llama.cpp's gpt2 requires every bias: ours are zero
                t = torch.zeros(width)
            if t is not None:
                for name, rows in parts:
                    out[f"{name}.{kind}"] = rows(t)

    for i in range(c.n_layer):
        b, p = f"blocks.{i}.", f"blk.{i}."
        put(b + "norm1", [(p + "attn_norm", lambda t: t)], c.n_embd)
        put(b + "attn.qkv", linear_parts(c, b + "attn.qkv"), sd[b + "attn.qkv.weight"].shape[0])
        put(b + "attn.proj", linear_parts(c, b + "attn.proj"), c.n_embd)
        put(b + "norm2", [(p + "ffn_norm", lambda t: t)], c.n_embd)
        put(b + "mlp.up", linear_parts(c, b + "mlp.up"), sd[b + "mlp.up.weight"].shape[0])
        put(b + "mlp.down", linear_parts(c, b + "mlp.down"), c.n_embd)
    put("norm", [("output_norm", lambda t: t)], c.n_embd)
    if not c.tie_embeddings:  # a tied head is token_embd itself: llama.cpp reuses it when output is absent
        out["output.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def tensor_type(name: str, t: torch.Tensor, outtype: str) -> str:
    """The GGUF type a tensor is stored as: ``outtype`` for matrices; float32 for vectors and for
    the position table (as convert_hf_to_gguf does)."""
    if t.dim() == 1 or name == "position_embd.weight":
        return "f32"
    return outtype


def check_quantizable(tensors: dict[str, torch.Tensor], outtype: str) -> None:
    """Refuse, in one line, a block type whose blocks do not tile every row it would pack."""
    block = BLOCK.get(outtype)
    if block is None:
        return
    for name, t in tensors.items():
        if tensor_type(name, t, outtype) == outtype and t.shape[-1] % block:
            raise SlmError(f"cannot export to GGUF as {outtype}: {name} has rows of {t.shape[-1]} values, not a "
                           f"multiple of its {block}-value blocks (choose model sizes that are multiples of "
                           f"{block}, or --outtype f16)")


def vocabulary(tokenizer: Any) -> tuple[list[str], list[int], list[str]]:
    """Tokens in their byte-level spelling (by id), GGUF token types and the merges (``"a b"``, in
    rank order), read from the tokenizer's Hugging Face ``tokenizer.json`` form."""
    gguf = require("gguf", "GGUF export")
    hf = json.loads(tokenizer.to_hf_tokenizer_json())
    model = hf["model"]
    if model.get("type") != "BPE":
        raise SlmError(f"cannot export to GGUF: the tokenizer is {model.get('type')}, not a byte-level BPE")
    vocab: dict[str, int] = dict(model["vocab"])
    special: set[int] = set()
    for added in hf.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    special |= set(tokenizer.special_ids)
    if sorted(vocab.values()) != list(range(tokenizer.vocab_size)):
        raise SlmError(f"cannot export to GGUF: the tokenizer's ids are not 0..{tokenizer.vocab_size - 1} "
                       "without gaps: run slm prepare again")
    tokens = [""] * tokenizer.vocab_size
    for text, i in vocab.items():
        tokens[i] = text
    types = [int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL) for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def _gguf_path(out: str | Path) -> Path:
    """``out`` as the path of a GGUF file to write: refused when it is a folder or a non-GGUF file
    (an earlier GGUF is replaced, never an unrelated file)."""
    out = Path(out)
    if out.is_dir():
        raise SlmError(f"--out {out} is a folder: GGUF is one file, give a path such as {out / 'model.gguf'}")
    if out.is_file():
        with open(out, "rb") as f:
            if f.read(4) != b"GGUF":
                raise SlmError(f"--out {out} exists and is not a GGUF file: choose a new path")
    return out


def export_gguf(model: GPT, tokenizer: Any, out: str | Path, outtype: str = "f32") -> Path:
    """Write ``model`` and ``tokenizer`` to the GGUF file ``out`` (replaced atomically); see the
    module docstring for what goes in. Refuses what llama.cpp cannot compute, in one line."""
    if outtype not in OUTTYPES:
        raise SlmError(f"--outtype {outtype!r} is not supported: choose one of {', '.join(OUTTYPES)}")
    gguf = require("gguf", "GGUF export")
    c = model.config
    arch = gguf_architecture(c)
    if tokenizer.vocab_size != c.vocab_size:
        raise SlmError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model {c.vocab_size}")
    tensors = gguf_tensors(model)
    check_quantizable(tensors, outtype)
    tokens, types, merges = vocabulary(tokenizer)
    out = _gguf_path(out)

    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(out.stem)
        w.add_context_length(c.block_size)
        w.add_embedding_length(c.n_embd)
        w.add_block_count(c.n_layer)
        w.add_feed_forward_length(c.hidden_dim)
        w.add_head_count(c.n_head)
        w.add_head_count_kv(c.kv_heads)
        w.add_vocab_size(c.vocab_size)
        if arch == "llama":
            w.add_layer_norm_rms_eps(c.norm_eps)
            w.add_rope_dimension_count(c.head_dim)
            w.add_rope_freq_base(c.rope_theta)
        else:
            w.add_layer_norm_eps(c.norm_eps)
        file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16",
                     "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}[outtype]
        w.add_file_type(int(getattr(gguf.LlamaFileType, file_type)))
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(PRE_TOKENIZER)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(tokenizer.eot_id)
        w.add_eos_token_id(tokenizer.eot_id)
        w.add_pad_token_id(tokenizer.eot_id)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        template = getattr(tokenizer, "chat_template", None)
        if template is not None:
            from slmkit.chat import chat_template_jinja, special_ids

            w.add_eot_token_id(special_ids(tokenizer, template)[template["end"]])
            w.add_chat_template(chat_template_jinja(template))
        for name, t in tensors.items():
            kind = tensor_type(name, t, outtype)
            data = t.numpy().astype(np.float32)
            if kind == "f32":
                w.add_tensor(name, data)
            elif kind == "f16":
                w.add_tensor(name, data.astype(np.float16))
            else:
                qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
                w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


# ------------------------------------------------------------------------- LoRA adapters


def gguf_lora_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The adapters of an unmerged LoRA ``model`` under llama.cpp's adapter names: for each GGUF
    matrix ``W`` an adapter touches, ``W.lora_a`` (our A, (rank, in): GGUF ``ne`` (in, rank)) and
    ``W.lora_b`` (our B, (out, rank)), B's rows cut and permuted as ``linear_parts`` cuts the weight's
    (a fused QKV or gate/up adapter is one adapter per part sharing A; Q and K rows rotary-permuted)."""
    out: dict[str, torch.Tensor] = {}
    for path, m in lora_modules(model):
        a, b = m.lora_A.detach().float().cpu(), m.lora_B.detach().float().cpu()
        for name, rows in linear_parts(model.config, path):
            out[f"{name}.weight.lora_a"] = a.contiguous().clone()
            out[f"{name}.weight.lora_b"] = rows(b).contiguous().clone()
    return out


def export_gguf_adapter(model: GPT, out: str | Path, *, untied_base: bool = False) -> Path:
    """Write the adapters of an unmerged LoRA ``model`` as llama.cpp's LoRA adapter file ``out``
    (``general.type = adapter``, ``adapter.type = lora``): ``llama-cli -m BASE.gguf --lora out``.
    llama.cpp scales each adapter by ``adapter.lora.alpha / rank``, so alpha is written as
    ``scale * rank`` (rsLoRA's ``alpha / sqrt(rank)`` included). The base GGUF must be
    ``export_gguf`` of the model the adapters were trained on, with an untied ``output`` when the
    head has an adapter (``untied_base`` says the caller wrote it so; ``export_gguf_lora`` writes both)."""
    gguf = require("gguf", "GGUF export")
    mods = list(lora_modules(model))
    if not mods:
        raise SlmError("this model has no LoRA adapters to export (merged already, or never adapted)")
    if len({m.scale for _, m in mods}) > 1:
        raise SlmError("the model's adapters have different scales: a GGUF adapter holds one alpha")
    if any(path == "lm_head" for path, _ in mods) and model.config.tie_embeddings and not untied_base:
        raise SlmError("a head adapter on tied embeddings needs a base GGUF with its own output matrix: "
                       "use export_gguf_lora (slm export LORA_RUN --format gguf-lora)")
    arch = gguf_architecture(model.config)
    tensors = gguf_lora_tensors(model)
    out = _gguf_path(out)
    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_name(out.stem)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(mods[0][1].scale * mods[0][1].rank))
        for name, t in tensors.items():
            w.add_tensor(name, t.numpy().astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


def gguf_lora_base(model: GPT) -> GPT:
    """The base a LoRA ``model``'s adapters were trained on, for its GGUF (a copy; ``model`` keeps
    its adapters): new token rows as the run trained them (an adapter file cannot carry embedding
    rows), and the head untied (a copy of the embedding) when it has an adapter, so that llama.cpp
    applies that adapter to the head alone and not to the embedding lookup too."""
    head = any(path == "lm_head" for path, _ in lora_modules(model))
    base = strip_lora(copy.deepcopy(model))
    if head and base.config.tie_embeddings:
        base.lm_head.weight = nn.Parameter(base.tok_emb.weight.detach().clone())
        base.config.tie_embeddings = False
    return base


def export_gguf_lora(model: GPT, tokenizer: Any, out: str | Path, outtype: str = "f32") -> Path:
    """An unmerged LoRA ``model`` as the folder ``out``: ``base.gguf`` (``export_gguf`` of
    ``gguf_lora_base``, ``outtype``) and ``adapter.gguf`` (``export_gguf_adapter``, float32), so that
    ``llama-cli -m out/base.gguf --lora out/adapter.gguf`` computes the run."""
    base = gguf_lora_base(model)
    gguf_architecture(model.config)  # refuse before the folder is touched
    if outtype in BLOCK:
        check_quantizable(gguf_tensors(base), outtype)
    with output_dir(Path(out)) as tmp:
        export_gguf(base, tokenizer, tmp / "base.gguf", outtype)
        export_gguf_adapter(model, tmp / "adapter.gguf", untied_base=not base.config.tie_embeddings)
        write_json(tmp / META_FILE, export_meta(base, tokenizer, "gguf-lora", base="base.gguf",
                                                adapter="adapter.gguf", outtype=outtype))
    return Path(out)


def export_gguf_lora_run(run_dir: str | Path, out: str | Path, outtype: str = "f32", which: str = "best") -> Path:
    """``slm export LORA_RUN --format gguf-lora``: ``export_gguf_lora`` of the run's unmerged model
    (its base grown to the run's vocabulary, the new token rows as trained) and its tokenizer."""
    from slmkit.checkpoint import lora_model_from_checkpoint, read_run_checkpoint
    from slmkit.tokenizer import load_tokenizer

    model = lora_model_from_checkpoint(read_run_checkpoint(run_dir, which)).float().cpu().eval()
    return export_gguf_lora(model, load_tokenizer(Path(run_dir) / "tokenizer"), out, outtype)
