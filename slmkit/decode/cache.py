"""The preallocated KV cache that generation hands to the model and the decoders."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slmkit.model import ModelConfig


@dataclass
class KVCache:
    """The keys and values of every token seen so far, so that generation runs one token per step.
    It implements ``slmkit.model.Cache``, the protocol ``GPT.forward`` reads.

    Buffers are allocated once, for ``max_len`` slots (at most the context length), and filled
    left to right: ``length`` slots are in use. All rows of a batch share slot indices, so a batch
    of prompts of different lengths is left-padded: row ``b``'s first real token is in slot
    ``start[b]``. Positions count from there (the first real token has position 0), and padding
    slots are masked out, so a row's numbers do not depend on what else is in the batch.
    The buffers start as zeros, and must: ``GraphDecoder`` attends over every slot with the
    unfilled ones masked, and a zero weight times a NaN left in memory would still be NaN.
    """

    k: torch.Tensor  # (n_layer, B, n_kv_head, max_len, head_dim)
    v: torch.Tensor  # same shape as k
    start: torch.Tensor  # (B,) first real slot of each row
    length: int = 0  # slots filled so far
    padded: bool = False  # whether any row has padding (else no mask is needed when decoding)

    @classmethod
    def empty(
        cls, config: ModelConfig, batch_size: int, *, start: torch.Tensor | None = None,
        max_len: int | None = None, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        max_len = max_len or config.block_size
        shape = (config.n_layer, batch_size, config.kv_heads, max_len, config.head_dim)
        if start is None:
            start = torch.zeros(batch_size, dtype=torch.long, device=device)
        k, v = torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        return cls(k, v, start.to(device=device, dtype=torch.long), padded=bool(start.any()))

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def positions(self, T: int) -> torch.Tensor:
        """Positions (B, T) of the next T slots of every row (padding slots get 0). Refuses T
        tokens that do not fit: the model asks this first."""
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {T} tokens > {self.max_len} slots")
        slots = torch.arange(self.length, self.length + T, device=self.start.device)
        return (slots - self.start[:, None]).clamp_(min=0)

    def attn_mask(self, T: int) -> torch.Tensor | None:
        """Boolean mask (B, 1, T, length+T) for the next T queries: causal, and no real token sees
        padding. A padding query sees only itself, which keeps its (unused) values finite.
        None when nothing needs masking: one new token per row and no padding."""
        if T == 1 and not self.padded:
            return None
        device = self.start.device
        q = torch.arange(self.length, self.length + T, device=device)[:, None]  # (T, 1) query slots
        kv = torch.arange(self.length + T, device=device)  # (S,) key slots
        real = kv >= self.start[:, None, None]  # (B, 1, S)
        return ((kv <= q) & (real | (kv == q)))[:, None]

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one layer's new keys and values (B, n_kv, T, head_dim) after the filled slots and
        return that layer's keys and values for all slots so far. ``length`` is advanced by the
        model once every layer has stored."""
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows ``rows`` (in that order, repeats allowed): beam search follows its beams."""
        self.k, self.v, self.start = self.k[:, rows], self.v[:, rows], self.start[rows]
