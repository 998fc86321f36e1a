"""The ``Decoder`` interface and the rule by which a backend says which models it can run.

A backend declares, as class attributes, the devices and dtypes it runs on and, for every field
of ``ModelConfig`` that it reads, the values it handles (``handles``). A field it does not list
is accepted only at its default value. So a new model feature (say ``qk_norm: bool = False``)
lands in ``model.py`` alone: models that leave it off still get every fast path, models that turn
it on fall back to the reference (``ModuleDecoder``, which runs ``model.forward`` and so handles
everything) until a backend implements the feature and lists it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any, ClassVar

import torch
import torch.nn as nn

from slmkit.model import GPT, Cache


class _Any:
    """A collection holding every value: ``handles[field] = ANY``."""

    def __contains__(self, value: object) -> bool:
        return True

    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _Any()

# The sizes and constants of the architecture: fields every backend reads as plain numbers.
SIZES: dict[str, Collection] = {name: ANY for name in (
    "vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_hidden", "dropout", "rope_theta", "norm_eps")}


def reads_float_weights(model: GPT) -> bool:
    """Whether every linear layer is exactly ``nn.Linear``, whose weight a fast path reads directly
    (``torch.ao`` int8 dynamic quantization packs its weights, and a subclass may change what
    forward does, e.g. a LoRA adapter)."""
    linears = [model.lm_head] + [m for b in model.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.up, b.mlp.down)]
    return all(type(m) is nn.Linear for m in linears)


def placement(model: GPT) -> tuple[torch.device, torch.dtype]:
    """The device and dtype a model runs in: those of its token embedding."""
    w = model.tok_emb.weight
    return w.device, w.dtype


class Decoder:
    """Runs a model over a KV cache: ``prefill(ids (B, T), cache)`` and then ``step(ids (B,),
    cache)`` one token per row, each returning the next-token logits (B, vocab) and advancing
    ``cache.length``. Make one per generation: a backend may look the weights up once.

    Subclasses declare what they support (see the module docstring) and override ``step``; the
    prefill is the model's own forward (one call per generation) unless a backend has a faster one
    (the C++ step runs a prompt as extra tokens of its steps)."""

    name: ClassVar[str] = "?"
    devices: ClassVar[Collection[str]] = ANY  # device types, e.g. {"cpu"}
    dtypes: ClassVar[Collection[torch.dtype]] = ANY
    handles: ClassVar[Mapping[str, Collection]] = {}  # ModelConfig field -> values handled (see above)
    plain_linears: ClassVar[bool] = True  # needs reads_float_weights(model)
    # KV cache element types its steps read besides the model's own dtype (native: bfloat16)
    kv_dtypes: ClassVar[Collection[torch.dtype]] = ()
    # step(..., need=) skips the head of the rows whose logits nobody reads (else all rows get them)
    skips_logits: ClassVar[bool] = False
    # step(..., holes=) runs only the other rows (the holes' slot and logits are left as they are)
    skips_rows: ClassVar[bool] = False
    # step(..., extra=) feeds a row several tokens in one step, the others into the slots before
    # its last one (a prompt joining a batch), with the same bits as one token a step
    feeds_many: ClassVar[bool] = False
    # step() reads a cache whose keys and values are the first rows of larger buffers
    # (KVCache.buffer_rows: a continuous batch keeps room for rows that join); else contiguous ones
    strided_kv: ClassVar[bool] = False

    def __init__(self, model: GPT) -> None:
        self.model = model

    @classmethod
    def why_not(cls, model: GPT, device: torch.device | None = None, dtype: torch.dtype | None = None) -> str | None:
        """Why this backend cannot run ``model`` on ``device`` in ``dtype`` (None: it can). Without
        a device and dtype, only the model's features and layers are checked."""
        if device is not None and torch.device(device).type not in cls.devices:
            return f"it runs on {'/'.join(sorted(cls.devices))}, not {torch.device(device).type}"
        if dtype is not None and dtype not in cls.dtypes:
            names = "/".join(str(d).removeprefix("torch.") for d in cls.dtypes)
            return f"it runs {names} models, not {str(dtype).removeprefix('torch.')}"
        for f in dataclasses.fields(model.config):
            value = getattr(model.config, f.name)
            allowed = cls.handles.get(f.name)
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            if allowed is None and value != default:
                return f"it does not implement model.{f.name}={value!r} (only the default, {default!r})"
            if allowed is not None and value not in allowed:
                return f"it does not implement model.{f.name}={value!r}"
        if cls.plain_linears and not reads_float_weights(model):
            return "it reads plain nn.Linear weights and this model's linear layers are quantized or wrapped"
        return None

    @classmethod
    def supports(cls, model: GPT, device: torch.device | None = None, dtype: torch.dtype | None = None) -> bool:
        return cls.why_not(model, device, dtype) is None

    @classmethod
    def check(cls, model: GPT, placed: bool = True) -> None:
        """Raise ValueError unless this backend runs ``model`` (where it is, if ``placed``)."""
        why = cls.why_not(model, *placement(model)) if placed else cls.why_not(model)
        if why is not None:
            raise ValueError(f"the {cls.name!r} decoder ({cls.__name__}) cannot run this model: {why}; "
                             "generate with path='cached'")

    @classmethod
    def reproduces(cls, model: GPT) -> GPT:
        """The model whose forward this backend's logits follow: ``model`` itself, or, for a
        backend that stores the weights in a narrower format, a copy with them rounded to it
        (the parity test compares every backend against this model's forward)."""
        return model

    def prefill(self, ids: torch.Tensor, cache: Cache) -> torch.Tensor:
        """Run T new tokens per row (B, T) after the cached ones; the last position's logits (B, vocab)."""
        return self.model(ids, last_only=True, cache=cache)[0][:, -1]

    def step(self, ids: torch.Tensor, cache: Cache, need: torch.Tensor | None = None) -> torch.Tensor:
        """One new token per row, ids (B,) -> next-token logits (B, vocab). ``need``: None, or a bool
        (B,) marking the rows whose logits the caller reads; a backend that ``skips_logits`` leaves
        the others' out (zeros), the rest compute them all. Every row's keys and values are stored."""
        raise NotImplementedError
