"""Scoring next-token predictions: the sums behind loss, perplexity, bits per byte and accuracy.

``score_batches`` runs a model over batches into a ``Tally``, ``evaluate_tokens`` over a token
stream's windows: validation during training and ``slm eval`` both call it, so both report the
same numbers (the training loop hands in its processes, which share the batches round-robin).
Loss and perplexity are over every target token, ``<|endoftext|>`` included (as before and as
nanoGPT reports them). Bits per byte is the nats of the targets that are text, over the UTF-8
bytes those targets stand for: special tokens have no bytes, so their loss is left out of it, as
lm-eval-harness and nanochat do. Counting the bytes of the scored targets themselves also makes a
partial evaluation (the first N batches) exact, with no byte count to extrapolate.
``evaluate_chat`` scores an SFT split the same way, on its supervised targets only (the responses
and their end tokens): fine-tuning's validation and ``slm eval --data SFT_DIR``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from slmkit.data import ChatSplit, chat_eval_batches, eval_batches
from slmkit.errors import SlmError
from slmkit.runtime import autocast

if TYPE_CHECKING:
    from slmkit.distributed import Dist

Batch = tuple[torch.Tensor, torch.Tensor]


class Tally:
    """Running sums over scored targets: ``add`` batches of logits, then read ``metrics()``."""

    FIELDS = ("nats", "text_nats", "text_bytes", "correct", "tokens")

    def __init__(self, token_bytes: Sequence[int] | torch.Tensor) -> None:
        """``token_bytes[i]``: the UTF-8 bytes of text token ``i`` stands for, 0 for special tokens
        (``Tokenizer.token_byte_lengths()``)."""
        self.token_bytes = torch.as_tensor(token_bytes, dtype=torch.int64)
        self.nats = self.text_nats = 0.0
        self.text_bytes = self.correct = self.tokens = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Score logits (..., vocab) against targets (...); targets of -1 are not scored."""
        # Ignored targets are masked, not indexed out: indexing would copy all the logits.
        logits, targets = logits.float().flatten(0, -2), targets.flatten()
        keep = targets != -1
        losses = F.cross_entropy(logits, targets, reduction="none", ignore_index=-1)  # 0 where ignored
        if self.token_bytes.device != targets.device:
            self.token_bytes = self.token_bytes.to(targets.device)
        nbytes = self.token_bytes[targets.clamp(min=0)] * keep
        self.nats += losses.sum().item()
        self.text_nats += losses[nbytes > 0].sum().item()
        self.text_bytes += int(nbytes.sum().item())
        self.correct += int(((logits.argmax(-1) == targets) & keep).sum().item())
        self.tokens += int(keep.sum().item())

    def totals(self) -> list[float]:
        """The sums, in ``FIELDS`` order, for adding up over processes."""
        return [float(getattr(self, f)) for f in self.FIELDS]

    def set_totals(self, totals: Sequence[float]) -> None:
        for f, v in zip(self.FIELDS, totals):
            setattr(self, f, v)

    def metrics(self) -> dict[str, float]:
        """loss (nats per target token), perplexity, bpb (bits per byte of text), accuracy, tokens."""
        if self.tokens == 0:
            raise ValueError("no target tokens were scored")
        loss = self.nats / self.tokens
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)),
            "bpb": self.text_nats / math.log(2) / max(self.text_bytes, 1),
            "accuracy": self.correct / self.tokens,
            "tokens": int(self.tokens),
        }


def _round_robin(batches: Iterable[Batch], rank: int, world: int) -> Iterator[tuple[Batch, bool]]:
    """(batch, counts) for this rank: rank r takes batches r, r + world, ... Every rank runs as many
    forwards, as FSDP's all-gathers need: one short of a batch in the last round repeats one that
    does not count. One process takes every batch as it comes (nothing is held in memory)."""
    if world == 1:
        yield from ((b, True) for b in batches)
        return
    listed = list(batches)
    for i in range(rank, math.ceil(len(listed) / world) * world, world):
        yield listed[min(i, len(listed) - 1)], i < len(listed)


@torch.no_grad()
def score_batches(
    model: torch.nn.Module, batches: Iterable[Batch], token_bytes: Sequence[int] | torch.Tensor, *,
    device: str = "cpu", dtype: torch.dtype = torch.float32, dist: Dist | None = None,
) -> Tally:
    """Score ``model`` (put in eval mode) on (x, y) batches, targets of -1 not scored, under
    ``dtype`` autocast. ``dist``: the processes sharing the batches round-robin; the tally that
    comes back is the sum over all of them, the same on every rank."""
    model.eval()
    tally = Tally(token_bytes)
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    for (x, y), counts in _round_robin(batches, rank, world):
        with autocast(device, dtype):
            logits, _ = model(x.to(device))
        if counts:
            tally.add(logits, y.to(device))
    if world > 1:
        tally.set_totals([v * world for v in dist.all_mean(tally.totals())])
    return tally


def evaluate_tokens(
    model: torch.nn.Module, tokens: np.ndarray, token_bytes: Sequence[int] | torch.Tensor, *, batch_size: int = 8,
    device: str = "cpu", max_batches: int | None = None, dtype: torch.dtype = torch.float32, dist: Dist | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` on a token stream; ``token_bytes[i]`` is the UTF-8 bytes of text token
    ``i`` stands for, 0 for special tokens (``Tokenizer.token_byte_lengths()``).

    The stream is cut into non-overlapping windows of the model's context, so every token after the
    first is predicted exactly once (with less context at the start of each window, as in nanoGPT
    and llama2.c evaluations); ``max_batches`` keeps the first that many batches of windows.
    Returns loss (nats/token), perplexity, bpb, accuracy, tokens.
    """
    block = model.config.block_size

    def batches() -> Iterator[Batch]:
        yield from eval_batches(tokens, block, batch_size, max_batches)
        covered = ((len(tokens) - 1) // block) * block
        if max_batches is None and len(tokens) - covered >= 2:
            # The windows leave a tail shorter than the context: score it too, so every token counts.
            tail = torch.from_numpy(np.asarray(tokens[covered:], dtype=np.int64))
            yield tail[None, :-1], tail[None, 1:]

    tally = score_batches(model, batches(), token_bytes, device=device, dtype=dtype, dist=dist)
    if tally.tokens == 0:
        raise SlmError("nothing to evaluate: the text is shorter than two tokens")
    return tally.metrics()


def evaluate_chat(
    model: torch.nn.Module, split: ChatSplit, token_bytes: Sequence[int] | torch.Tensor, *, pad_id: int,
    batch_size: int = 8, device: str = "cpu", max_batches: int | None = None, dtype: torch.dtype = torch.float32,
    dist: Dist | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` on the examples of an SFT split (``data.open_chat_split``), in order,
    padded batches: loss, perplexity, bpb and accuracy over the supervised targets only (prompts
    and padding are not scored); ``max_batches`` keeps the first that many batches."""
    batches = chat_eval_batches(split, model.config.block_size, batch_size, pad_id, max_batches)
    tally = score_batches(model, batches, token_bytes, device=device, dtype=dtype, dist=dist)
    if tally.tokens == 0:
        raise SlmError("nothing to evaluate: the examples have no supervised tokens within the context")
    return tally.metrics()
