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

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slmkit.errors import SlmError
from slmkit.export.common import interleave_rope_rows, require
from slmkit.files import atomic_file
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


def gguf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """``model``'s weights under llama.cpp's tensor names, float32, in its orientation (PyTorch's
    (out, in) is GGUF's (in, out) ``ne``), Q/K rows in llama.cpp's rotary layout for ``llama``."""
    c = model.config
    arch = gguf_architecture(c)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    H, KV, D, hidden = c.n_head, c.kv_heads, c.head_dim, c.hidden_dim
    out: dict[str, torch.Tensor] = {"token_embd.weight": sd["tok_emb.weight"]}
    if arch == "gpt2":
        out["position_embd.weight"] = sd["pos_emb.weight"]

    def put(name: str, ours: str, biases: bool, bias_size: int | None = None, fn=lambda t: t) -> None:
        out[f"{name}.weight"] = fn(sd[f"{ours}.weight"])
        if f"{ours}.bias" in sd:
            out[f"{name}.bias"] = fn(sd[f"{ours}.bias"])
        elif biases:  # llama.cpp's gpt2 requires every bias: ours are zero
            out[f"{name}.bias"] = torch.zeros(bias_size or sd[f"{ours}.weight"].shape[0])

    gpt2 = arch == "gpt2"
    for i in range(c.n_layer):
        b, p = f"blocks.{i}.", f"blk.{i}."
        put(p + "attn_norm", b + "norm1", gpt2, c.n_embd)
        if gpt2:
            put(p + "attn_qkv", b + "attn.qkv", True)
        else:
            qkv = {"weight": sd[b + "attn.qkv.weight"], "bias": sd.get(b + "attn.qkv.bias")}
            for kind, t in qkv.items():
                if t is None:
                    continue
                q, k, v = t.split([H * D, KV * D, KV * D])
                out[f"{p}attn_q.{kind}"] = interleave_rope_rows(q, H)
                out[f"{p}attn_k.{kind}"] = interleave_rope_rows(k, KV)
                out[f"{p}attn_v.{kind}"] = v
        put(p + "attn_output", b + "attn.proj", gpt2)
        put(p + "ffn_norm", b + "norm2", gpt2, c.n_embd)
        if gpt2:
            put(p + "ffn_up", b + "mlp.up", True)
        else:
            for kind in ("weight", "bias"):
                if b + f"mlp.up.{kind}" in sd:
                    gate, up = sd[b + f"mlp.up.{kind}"].split([hidden, hidden])
                    out[f"{p}ffn_gate.{kind}"], out[f"{p}ffn_up.{kind}"] = gate, up
        put(p + "ffn_down", b + "mlp.down", gpt2)
    put("output_norm", "norm", gpt2, c.n_embd)
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
    out = Path(out)
    if out.is_dir():
        raise SlmError(f"--out {out} is a folder: GGUF is one file, give a path such as {out / 'model.gguf'}")
    if out.is_file():  # replace an earlier GGUF, never an unrelated file
        with open(out, "rb") as f:
            if f.read(4) != b"GGUF":
                raise SlmError(f"--out {out} exists and is not a GGUF file: choose a new path")

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
