"""``slm export --format onnx``: ``model.onnx`` (full sequence) and ``model_kv.onnx`` (KV cache)
for onnxruntime, optionally with onnxruntime's dynamic int8 quantization. Read them back with
``slmkit.generate.onnx.OnnxGenerator``."""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slmkit.export.common import META_FILE, export_meta, output_dir, require, write_json
from slmkit.model import GPT


class PastCache:
    """The KV cache of ``model_kv.onnx``, as ``slmkit.model.Cache``: the past keys and values come
    in as tensors stacked over layers, ``(n_layer, B, n_kv_head, past_len, head_dim)``, every row
    with the same positions (no padding), and each layer's new keys and values are appended to
    them; ``keys`` and ``values`` collect the results, the graph's presents. Sizes are read from
    the tensors, not from ``length``, so that the traced graph keeps them dynamic."""

    def __init__(self, past_key: torch.Tensor, past_value: torch.Tensor) -> None:
        self.past_key, self.past_value = past_key, past_value
        self.length = 0  # the model adds the new tokens; the graph does not read it
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def _query_positions(self, T: int) -> torch.Tensor:
        return torch.arange(T, device=self.past_key.device) + self.past_key.shape[3]  # (T,)

    def positions(self, T: int) -> torch.Tensor:
        return self._query_positions(T)[None]  # (1, T): the same for every row

    def attn_mask(self, T: int) -> torch.Tensor:
        keys = torch.arange(T + self.past_key.shape[3], device=self.past_key.device)
        return (keys[None, :] <= self._query_positions(T)[:, None])[None, None]  # (1, 1, T, S): causal

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = torch.cat([self.past_key[layer], k], dim=2), torch.cat([self.past_value[layer], v], dim=2)
        self.keys.append(k)
        self.values.append(v)
        return k, v


class ExportGPT(nn.Module):
    """The module the ONNX exporter traces: the model's own forward (``GPT.hidden``; while
    exporting, ``model.py`` writes attention and RMSNorm with plain ops that the exporter handles)
    and the vocabulary head. ``cached=False``: ``input_ids -> logits``. ``cached=True``:
    ``(input_ids, past_key, past_value) -> (logits, present_key, present_value)``, through a
    ``PastCache``; the new tokens take positions ``past_len .. past_len + T - 1``. An empty past
    (length 0) makes it the prefill; then one token per call. ``shared_head=False`` writes a tied
    head as a plain ``h @ W^T`` (a transposed copy of the embedding that int8 quantization can
    compress)."""

    def __init__(self, model: GPT, cached: bool, shared_head: bool = True) -> None:
        super().__init__()
        self.model, self.cached = model, cached
        self.shared_head = shared_head and model.config.tie_embeddings

    def forward(self, input_ids: torch.Tensor, past_key: torch.Tensor | None = None,
                past_value: torch.Tensor | None = None):
        m = self.model
        cache = PastCache(past_key, past_value) if self.cached else None
        h = m.hidden(input_ids, cache)
        if self.shared_head:
            # (W @ h^T)^T reads the head's weight as stored, so a tied head shares the embedding's
            # initializer instead of the exporter adding a transposed copy of the whole table.
            B, T = input_ids.shape
            logits = (m.lm_head.weight @ h.reshape(-1, h.shape[-1]).t()).t().reshape(B, T, -1)
        else:  # h @ W^T: the form int8 quantizers recognise (weight as MatMul's second input)
            logits = m.lm_head(h)
        if cache is None:
            return logits
        return logits, torch.stack(cache.keys), torch.stack(cache.values)


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
