"""``slm export --format onnx``: ``model.onnx`` (full sequence) and ``model_kv.onnx`` (KV cache)
for onnxruntime, optionally with onnxruntime's dynamic int8 quantization. Read them back with
``slmkit.generate.onnx.OnnxGenerator``."""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from slmkit.export.common import META_FILE, export_meta, output_dir, require, write_json
from slmkit.model import GPT


class ExportGPT(nn.Module):
    """Our GPT's forward written with plain ops that every exporter handles (no SDPA, no RMSNorm
    op), reusing the model's weights. ``cached=False``: ``input_ids -> logits``.
    ``cached=True``: ``(input_ids, past_key, past_value) -> (logits, present_key, present_value)``
    where the caches are stacked over layers, ``(n_layer, B, n_kv_head, past_len, head_dim)``,
    and the new tokens take positions ``past_len .. past_len + T - 1``. An empty past (length 0)
    makes it the prefill; then one token per call. ``shared_head=False`` writes a tied head as a
    plain ``h @ W^T`` (a transposed copy of the embedding that int8 quantization can compress)."""

    def __init__(self, model: GPT, cached: bool, shared_head: bool = True) -> None:
        super().__init__()
        self.model, self.cached = model, cached
        self.shared_head = shared_head and model.config.tie_embeddings
        c = model.config
        self.n_head, self.n_kv, self.head_dim = c.n_head, c.kv_heads, c.head_dim

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(norm, nn.LayerNorm):
            return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.weight

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def forward(self, input_ids: torch.Tensor, past_key: torch.Tensor | None = None,
                past_value: torch.Tensor | None = None):
        m = self.model
        B, T = input_ids.shape
        past = past_key.shape[3] if self.cached else 0
        pos = torch.arange(T, device=input_ids.device) + past  # (T,)
        x = m.tok_emb(input_ids)
        if m.pos_emb is not None:
            x = x + m.pos_emb(pos)
        cos = sin = None
        if m.rope_cos is not None:
            cos, sin = m.rope_cos[pos], m.rope_sin[pos]  # (T, head_dim/2)
        keys = torch.arange(T + past, device=input_ids.device)
        allowed = keys[None, :] <= pos[:, None]  # (T, S): causal over past + new tokens
        bias = torch.zeros(allowed.shape, dtype=x.dtype).masked_fill(~allowed, float("-inf"))
        hd, scale = self.head_dim, 1.0 / math.sqrt(self.head_dim)
        presents_k, presents_v = [], []
        for i, block in enumerate(m.blocks):
            a = block.attn
            h = self._norm(block.norm1, x)
            q, k, v = a.qkv(h).split([self.n_head * hd, self.n_kv * hd, self.n_kv * hd], dim=-1)
            q = q.reshape(B, T, self.n_head, hd).transpose(1, 2)
            k = k.reshape(B, T, self.n_kv, hd).transpose(1, 2)
            v = v.reshape(B, T, self.n_kv, hd).transpose(1, 2)
            if cos is not None:
                q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            if self.cached:
                k = torch.cat([past_key[i], k], dim=2)
                v = torch.cat([past_value[i], v], dim=2)
                presents_k.append(k)
                presents_v.append(v)
            if self.n_kv != self.n_head:  # GQA: each kv head serves n_head/n_kv query heads
                rep = self.n_head // self.n_kv
                k = k[:, :, None].expand(-1, -1, rep, -1, -1).reshape(B, self.n_head, -1, hd)
                v = v[:, :, None].expand(-1, -1, rep, -1, -1).reshape(B, self.n_head, -1, hd)
            att = torch.softmax(q @ k.transpose(-1, -2) * scale + bias, dim=-1)
            y = (att @ v).transpose(1, 2).reshape(B, T, self.n_head * hd)
            x = x + a.proj(y)
            x = x + block.mlp(self._norm(block.norm2, x))
        h = self._norm(m.norm, x)
        if self.shared_head:
            # (W @ h^T)^T reads the head's weight as stored, so a tied head shares the embedding's
            # initializer instead of the exporter adding a transposed copy of the whole table.
            logits = (m.lm_head.weight @ h.reshape(-1, h.shape[-1]).t()).t().reshape(B, T, -1)
        else:  # h @ W^T: the form int8 quantizers recognise (weight as MatMul's second input)
            logits = m.lm_head(h)
        if not self.cached:
            return logits
        return logits, torch.stack(presents_k), torch.stack(presents_v)


def _onnx_export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
                 dynamic_axes: dict[str, dict[int, str]]) -> None:
    require("onnx", "ONNX export")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and legacy-exporter deprecation warnings
        torch.onnx.export(
            module, args, str(path), dynamo=False, opset_version=17, do_constant_folding=True,
            input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
        )


def quantize_onnx(src: str | Path, dst: str | Path) -> None:
    """onnxruntime's dynamic int8 quantization of the MatMul/Gemm weights (per output channel)."""
    quant = require("onnxruntime.quantization", "int8 quantization of ONNX models")
    import logging

    logging.disable(logging.WARNING)  # "consider pre-processing": advice that does not apply here
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            quant.quantize_dynamic(str(src), str(dst), weight_type=quant.QuantType.QInt8, per_channel=True,
                                   op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        logging.disable(logging.NOTSET)


def export_onnx(model: GPT, tokenizer: Any | None, out: str | Path, quantize: str | None = None) -> Path:
    """Write ``model.onnx`` (full sequence) and ``model_kv.onnx`` (with KV cache) into ``out``,
    plus the tokenizer's ``tokenizer.json`` (``tokenizer=None``, e.g. in benchmarks: none)."""
    c = model.config
    model = model.eval()
    with output_dir(Path(out)) as tmp:
        work = Path(tempfile.mkdtemp(dir=tmp)) if quantize else tmp
        ids = torch.randint(0, c.vocab_size, (1, 4))
        shared = not quantize
        _onnx_export(ExportGPT(model, cached=False, shared_head=shared), (ids,), work / "model.onnx", ["input_ids"], ["logits"],
                     {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}})
        past = torch.zeros(c.n_layer, 1, c.kv_heads, 3, c.head_dim)
        cache_axes = {0: "batch", 1: "sequence"}
        _onnx_export(
            ExportGPT(model, cached=True, shared_head=shared), (ids, past, past.clone()), work / "model_kv.onnx",
            ["input_ids", "past_key", "past_value"], ["logits", "present_key", "present_value"],
            {"input_ids": cache_axes, "logits": cache_axes,
             "past_key": {1: "batch", 3: "past_sequence"}, "past_value": {1: "batch", 3: "past_sequence"},
             "present_key": {1: "batch", 3: "total_sequence"}, "present_value": {1: "batch", 3: "total_sequence"}},
        )
        if quantize:
            for name in ("model.onnx", "model_kv.onnx"):
                quantize_onnx(work / name, tmp / name)
            shutil.rmtree(work)
        if tokenizer is not None:
            (tmp / "tokenizer.json").write_text(tokenizer.to_hf_tokenizer_json(), encoding="utf-8")
        write_json(tmp / META_FILE, export_meta(model, tokenizer, "onnx", quantize=quantize,
                                           files={"full": "model.onnx", "kv": "model_kv.onnx"}))
    return Path(out)
