"""``slm export --format torchscript``: ``model.pt``, a traced module, optionally with PyTorch's
dynamic int8 quantization of the linear layers (``quantize_int8``, also usable on an eager model)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slmkit.export.common import META_FILE, export_meta, output_dir, write_json
from slmkit.model import GPT


def quantize_int8(model: GPT) -> nn.Module:
    """PyTorch dynamic int8 quantization of every nn.Linear (a copy; CPU inference only)."""
    import copy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notice
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8)


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)[0]


def export_torchscript(model: GPT, tokenizer: Any | None, out: str | Path, quantize: str | None = None) -> Path:
    """Write ``model.pt``, a traced ``input_ids (B, T) -> logits (B, T, vocab)`` module; batch and
    sequence length stay free (up to the context length)."""
    c = model.config
    module = quantize_int8(model) if quantize else model.cpu().eval()
    meta = export_meta(model, tokenizer, "torchscript", quantize=quantize, files={"model": "model.pt"})
    with output_dir(Path(out)) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarning for the context-length check
        example = torch.randint(0, c.vocab_size, (1, min(4, c.block_size)))
        traced = torch.jit.trace(_LogitsOnly(module), (example,), check_trace=False)
        torch.jit.save(traced, str(tmp / "model.pt"), _extra_files={META_FILE: json.dumps(meta)})
        if tokenizer is not None:
            (tmp / "tokenizer.json").write_text(tokenizer.to_hf_tokenizer_json(), encoding="utf-8")
        write_json(tmp / META_FILE, meta)
    return Path(out)
