"""What every export format shares: the output folder, its ``slmkit_export.json``, optional imports."""

from __future__ import annotations

import contextlib
import importlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch

from slmkit.errors import SlmError
from slmkit.files import atomic_dir
from slmkit.generate.onnx import EXTRA_HINT, META_FILE  # defined by the reader, below this stage
from slmkit.model import GPT

EOT = "<|endoftext|>"


def require(module: str, what: str) -> Any:
    """Import an optional dependency or raise a one-line SlmError with the install hint."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SlmError(f"{what} needs the '{module.split('.')[0]}' package: {EXTRA_HINT}") from None


def version() -> str:
    """slmkit's version, recorded in every export's metadata."""
    from slmkit import __version__

    return __version__


@contextlib.contextmanager
def output_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``out``; on success it replaces ``out`` (``files.atomic_dir``).

    ``out`` may be missing, empty, or an earlier export (it holds ``slmkit_export.json``); anything
    else is refused, so an export never deletes a user's unrelated files.
    """
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise SlmError(f"--out {out} is a file: give a folder path (it is created)")
        if any(out.iterdir()) and not (out / META_FILE).is_file():
            raise SlmError(f"--out {out} exists and is not an earlier slmkit export: choose a new or empty folder")
    with atomic_dir(out) as tmp:
        yield tmp


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON with a final newline."""
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def export_meta(model: GPT, tokenizer: Any, fmt: str, **extra: Any) -> dict[str, Any]:
    """The contents of ``slmkit_export.json``: format, model config, the shapes a runtime needs, eot id."""
    c = model.config
    from slmkit.config import to_dict

    return {
        "format": fmt,
        "slmkit_version": version(),
        "model": to_dict(c),
        "vocab_size": c.vocab_size,
        "block_size": c.block_size,
        "n_layer": c.n_layer,
        "n_kv_head": c.kv_heads,
        "head_dim": c.head_dim,
        "eot_id": getattr(tokenizer, "eot_id", None),
        **extra,
    }


def file_sizes(directory: str | Path) -> dict[str, int]:
    """Bytes on disk of each file in an export folder."""
    return {p.name: p.stat().st_size for p in sorted(Path(directory).iterdir()) if p.is_file()}


def interleave_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a query or key projection (or its bias, 1-D) from slmkit's half-split rotary layout
    (pairs i and i + D/2, as HF Llama) to the interleaved one (pairs 2i and 2i + 1) that llama2.c's
    run.c and llama.cpp's ``llama`` architecture rotate (llama.cpp's convert_hf_to_gguf permutes HF
    Llama's rows the same way)."""
    if w.dim() == 1:
        return interleave_rope_rows(w[:, None], heads)[:, 0]
    out, width = w.shape
    return w.reshape(heads, 2, out // heads // 2, width).transpose(1, 2).reshape(out, width)


def split_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of ``interleave_rope_rows``."""
    out, width = w.shape
    return w.reshape(heads, out // heads // 2, 2, width).transpose(1, 2).reshape(out, width)
