"""Scoring next-token predictions: the sums behind loss, perplexity, bits per byte and accuracy.

Used by validation during training and by ``slm eval``, so both report the same numbers.
Loss and perplexity are over every target token, ``<|endoftext|>`` included (as before and as
nanoGPT reports them). Bits per byte is the nats of the targets that are text, over the UTF-8
bytes those targets stand for: special tokens have no bytes, so their loss is left out of it, as
lm-eval-harness and nanochat do. Counting the bytes of the scored targets themselves also makes a
partial evaluation (the first N batches) exact, with no byte count to extrapolate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


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
