"""Runners: the model's next-token logits for each row, step by step.

With the KV cache (``CachedRunner``) the prompt is prefilled in one forward pass, then each step
runs one token per row through a decoder from ``slmkit.decode``. ``path`` says which: "fast" (the
default) is the fastest backend that runs the model (``decode.pick``: the CUDA graph on a GPU, the
NumPy step for float32 on the CPU, else the PyTorch step, and the module path for int8-quantized
layers); "step" is always the PyTorch step, "cached" the module path (``model.forward`` with the
cache); any other backend name in ``decode.BACKENDS`` (e.g. "numpy") forces that one. "uncached"
(``UncachedRunner``) re-runs the whole window every step, as nanoGPT does; it is the reference the
cached paths are tested against. All of them follow the context rule below (the uncached reference
slides each row's window on its own).

The context rule. A prompt longer than the context (``block_size``) is cut from the left, with a
warning. When generation fills the context, the window slides: each row keeps its last
``block_size // 2`` tokens (``slide_window``, which ``export.OnnxGenerator`` uses too), which are
prefilled into a fresh cache, and generation goes on. (With learned positions nothing else is
possible, since positions stop at ``block_size``; for rotary positions it is still the only exact
choice, because cached keys of later layers depend on everything the token saw.) In a batch all
rows slide together, when the longest row fills the context, so a shorter row may slide earlier
than it would alone; until then a batch gives exactly the tokens of one-by-one runs.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from slmkit.decode import BACKENDS, KVCache, make_decoder
from slmkit.errors import SlmError

Path = Literal["fast", "step", "cached", "uncached"]  # or the name of a backend in decode.BACKENDS
# The decode backend behind each cached path (None: the fastest that runs the model).
DECODERS: dict[str, str | None] = {"fast": None, "step": "step", "cached": "cached"}


def _device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def fit_context(ids: list[int], block_size: int, eot_id: int | None = None) -> list[int]:
    """A prompt as the model will see it: cut from the left to the context, with a warning; an
    empty prompt becomes ``<|endoftext|>``, the start of a new document."""
    if not ids:
        if eot_id is None:
            raise SlmError("the prompt is empty and the tokenizer has no <|endoftext|> to start from: give a prompt")
        return [eot_id]
    if len(ids) > block_size:
        warnings.warn(
            f"prompt of {len(ids)} tokens is longer than the context ({block_size}): "
            f"keeping its last {block_size} tokens",
            stacklevel=3,
        )
        return list(ids[-block_size:])
    return list(ids)


def slide_window(context: list[int], block_size: int) -> list[int]:
    """The context rule for a full window (one token more than ``block_size``): the last
    ``block_size // 2`` tokens (at least one) are what the model sees next. Every generation path
    uses this, ``OnnxGenerator`` too, so all of them give the same tokens past the context."""
    return list(context[-max(1, block_size // 2) :])


class CachedRunner:
    """Run the model with a KV cache: prefill every row's context at once (left-padded), then one
    token per row per step. When the cache is full, every row keeps its last ``block_size // 2``
    tokens and they are prefilled into a fresh cache (the window slides)."""

    def __init__(self, model, contexts: list[list[int]], max_new_tokens: int, path: Path | str = "fast") -> None:
        self.model = model
        self.block_size = model.config.block_size
        self.device, self.dtype = _device_dtype(model)
        self.contexts = [list(c) for c in contexts]  # what the cache holds, to prefill again
        self.budget = max_new_tokens  # tokens still to come: the cache needs no more slots
        # One decoder per generation: it looks the weights up once here, not every step.
        self.decoder = make_decoder(model, DECODERS.get(path, path))
        self.step = self.decoder.step
        self.logits = self._prefill()

    def _prefill(self) -> torch.Tensor:
        n = max(len(c) for c in self.contexts)
        start = torch.tensor([n - len(c) for c in self.contexts])
        ids = torch.tensor([[0] * (n - len(c)) + c for c in self.contexts], device=self.device)
        slots = min(self.block_size, n + self.budget)
        self.cache = KVCache.empty(self.model.config, len(self.contexts), start=start, max_len=slots,
                                   device=self.device, dtype=self.dtype)
        return self.decoder.prefill(ids, self.cache).float()

    def advance(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row; return (and keep in ``.logits``) the next-token logits."""
        self.budget -= 1
        for context, token in zip(self.contexts, tokens):
            context.append(token)
        if self.cache.length == self.block_size:  # the context is full: slide the window
            self.contexts = [slide_window(c, self.block_size) for c in self.contexts]
            self.logits = self._prefill()
        else:
            self.logits = self.step(torch.tensor(tokens, device=self.device), self.cache).float()
        return self.logits

    def select(self, rows: list[int]) -> None:
        """Keep these rows, in this order (repeats allowed): drop finished rows, follow beams."""
        self.contexts = [list(self.contexts[r]) for r in rows]
        index = torch.tensor(rows, device=self.device)
        self.cache.reorder(index)
        self.logits = self.logits[index]


class UncachedRunner:
    """The reference: re-run the model over each row's whole window at every step, as nanoGPT and
    llama2.c's Python do. Same context rule as ``CachedRunner``, so the same tokens, only slower."""

    def __init__(self, model, contexts: list[list[int]], max_new_tokens: int = 0) -> None:
        self.model = model
        self.block_size = model.config.block_size
        self.device, _ = _device_dtype(model)
        self.contexts = [list(c) for c in contexts]
        self.logits = self._run()

    def _run(self) -> torch.Tensor:
        rows = [self.model(torch.tensor([c], device=self.device), last_only=True)[0][:, -1] for c in self.contexts]
        return torch.cat(rows).float()

    def advance(self, tokens: list[int]) -> torch.Tensor:
        for context, token in zip(self.contexts, tokens):
            context.append(token)
            if len(context) > self.block_size:
                context[:] = slide_window(context, self.block_size)
        self.logits = self._run()
        return self.logits

    def select(self, rows: list[int]) -> None:
        self.contexts = [list(self.contexts[r]) for r in rows]
        self.logits = self.logits[torch.tensor(rows, device=self.logits.device)]


def make_runner(path: Path | str, model, contexts: list[list[int]], max_new_tokens: int):
    """The runner for ``path`` (see the module docstring)."""
    if path in DECODERS or path in BACKENDS:
        return CachedRunner(model, contexts, max_new_tokens, path)
    if path == "uncached":
        return UncachedRunner(model, contexts, max_new_tokens)
    raise ValueError(f"unknown path {path!r}: choose fast, step, cached or uncached (or a decoder: {', '.join(BACKENDS)})")
