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
    A continuous batch's rows may be the first rows of buffers with room for rows to come
    (``admit``'s ``room``): ``k`` and ``v`` are then views of them (``buffer_rows``), read by a
    decoder that reads filled slots only, so their slots past ``length`` are left unset.
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
        model once every layer has stored. A cache of another dtype than ``k``'s (a bf16 cache of
        a float32 model: ``NativeDecoder`` reads it) stores them rounded to its dtype and returns
        them widened back to ``k``'s, so the model attends to what the cache holds."""
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        keys, values = self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        if keys.dtype != k.dtype:
            keys, values = keys.to(k.dtype), values.to(k.dtype)
        return keys, values

    def reorder(self, rows: torch.Tensor, in_place: bool = False) -> None:
        """Keep rows ``rows`` (in that order, repeats allowed): beam search follows its beams. Rows
        kept in a buffer with room for more (``admit``'s ``room``), or in their own buffers when
        ``in_place`` (a reader of such a layout: ``buffer_rows``), stay in it, and only their
        filled slots move; when every row that moves comes from past the kept ones (a continuous
        batch closing its holes), only those rows are copied (none to drop the last rows)."""
        n, have = rows.numel(), self.buffer_rows()
        if have is not None and (in_place or have > self.k.size(1)) and n <= have:
            buffers, filled = self._buffers(have), self.length
            moves = [(to, row) for to, row in enumerate(rows.tolist()) if to != row]
            if all(row >= n for _, row in moves):  # no source is overwritten before it is read
                for buf in buffers:
                    for to, row in moves:
                        buf[:, to, :, :filled] = buf[:, row, :, :filled]
            else:
                for buf, kept in zip(buffers, (self.k[:, rows, :, :filled], self.v[:, rows, :, :filled])):
                    buf[:, :n, :, :filled] = kept
            self.k, self.v = buffers[0][:, :n], buffers[1][:, :n]
        else:
            self.k, self.v = self.k[:, rows], self.v[:, rows]
        self.start = self.start[rows]

    def buffer_rows(self) -> int | None:
        """How many rows the buffers under ``k`` and ``v`` hold, ``k`` and ``v`` being their first
        rows (``admit`` with ``room`` keeps room for rows to come); their own rows when they are
        contiguous; None for any other layout. The C++ decode step reads this layout in place."""
        k, v = self.k, self.v
        if k.is_contiguous() and v.is_contiguous():
            return k.size(1)
        _, B, H, T, D = k.shape
        row = H * T * D
        if k.stride() != v.stride() or k.stride()[1:] != (row, T * D, D, 1) or k.stride(0) % row \
                or k.storage_offset() or v.storage_offset():
            return None
        return k.stride(0) // row if k.stride(0) // row >= B else None

    def spare_buffers(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The whole key and value buffers under this cache when it is the first rows of buffers
        with room for more (``admit``'s ``room``), for ``admit(spare=)`` to take once this cache
        is dropped; None for any other layout."""
        have = self.buffer_rows()
        if have is None or have == self.k.size(1) and self.k.is_contiguous():
            return None
        return tuple(self._buffers(have))

    def _buffers(self, rows: int) -> list[torch.Tensor]:
        """The whole buffers of ``rows`` rows whose first rows ``k`` and ``v`` are (``buffer_rows``)."""
        shape = (self.k.size(0), rows, *self.k.shape[2:])
        return [t.as_strided(shape, t.stride()) for t in (self.k, self.v)]

    # --- continuous batching: rows join and leave between decode steps ---------------------------

    def shift(self, n: int) -> None:
        """Move every row's slots ``n`` to the right (n > 0) or left (n < 0): the same tokens at the
        same positions, ``length`` and ``start`` moved by ``n``. Left, at most ``min(start)``."""
        if n == 0:
            return
        if n > 0 and self.length + n > self.max_len:
            raise ValueError(f"KV cache full: shifting {self.length} slots by {n} > {self.max_len} slots")
        if n < 0 and (self.start.numel() == 0 or -n > int(self.start.min())):
            raise ValueError(f"cannot shift left by {-n}: a row starts at slot {int(self.start.min())}")
        lo = max(0, -n)
        for buf in (self.k, self.v):
            buf[:, :, :, lo + n : self.length + n] = buf[:, :, :, lo : self.length].clone()
            if n > 0:
                buf[:, :, :, :n] = 0
        self.length += n
        self.start = self.start + n
        self.padded = bool(self.start.any())

    def compact(self) -> None:
        """Drop the slots no row uses any more (left of every row's start): after the rows that
        started first have left, the rest move left and the cache has room again."""
        if self.start.numel():
            self.shift(-int(self.start.min()))

    def fill(self, row: int, other: KVCache) -> None:
        """Put ``other``'s one row (a new prompt, prefilled on its own) into row ``row``, whose
        sequence has left, lined up as ``admit`` lines rows up: ``admit`` without re-laying the
        cache out (a copy of that row's slots, not of every row's). Slots left of the new start
        keep what the old row left there; the mask hides them."""
        if other.k.size(1) != 1:
            raise ValueError(f"fill takes a cache of one row, not {other.k.size(1)}")
        if other.length > self.length:
            self.shift(other.length - self.length)
        offset = self.length - other.length
        self.k[:, row, :, offset : self.length] = other.k[:, 0, :, : other.length]
        self.v[:, row, :, offset : self.length] = other.v[:, 0, :, : other.length]
        self.start[row] = offset + int(other.start[0])
        self.padded = bool(self.start.any())

    def admit(self, other: KVCache, copies: int = 1, room: int = 0,
              spare: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Append ``other``'s rows (a cache of new prompts, prefilled on its own), ``copies`` times
        over, so that their last token lines up with this cache's last slot: rows join a running
        batch between decode steps. When ``other`` holds more tokens than this cache, this cache's
        rows move right first. A row's keys, values and positions are the same as in ``other``.

        ``room``: the most rows this cache is expected to hold, for a decoder that reads each row's
        filled slots only, in place (``Decoder.strided_kv``: the C++ step). New rows then go into
        buffers of ``room`` rows, allocated once (the rows no sequence has taken yet are never
        touched), so rows that join one after another do not copy the rows already there; only
        filled slots are written (the slots past ``length`` are written by the step that fills them
        before anything reads them). Without ``room`` every slot of a new row is set: zeros outside
        its tokens, as ``empty`` makes them (``GraphDecoder`` attends over every slot).
        ``spare``: key and value buffers of ``room`` rows to take instead of allocating them (a
        continuous batch keeps its last cache's: ``spare_buffers``); their contents do not matter."""
        if other.length > self.length:
            self.shift(other.length - self.length)
        offset, B, n, have = self.length - other.length, self.k.size(1), other.k.size(1) * copies, self.buffer_rows()
        filled = self.length if room else self.max_len
        if have is not None and have >= B + n:  # room left in the buffers
            buffers = self._buffers(have)
        else:  # new buffers (rows past B + n stay unset until a row is admitted there)
            shape = (self.k.size(0), max(room, B + n), *self.k.shape[2:])
            if spare is not None and all(t.shape == shape and t.dtype == self.k.dtype and t.device == self.k.device
                                         for t in spare):
                buffers = list(spare)
            else:
                buffers = [self.k.new_empty(shape), self.v.new_empty(shape)]
            buffers[0][:, :B, :, :filled], buffers[1][:, :B, :, :filled] = self.k[:, :, :, :filled], self.v[:, :, :, :filled]
        for buf, src in zip(buffers, (other.k, other.v)):
            new = buf[:, B : B + n]
            new[:, :, :, :offset] = 0
            new[:, :, :, self.length : filled] = 0
            new[:, :, :, offset : self.length] = src[:, :, :, : other.length].repeat(1, copies, 1, 1, 1)
        self.k, self.v = buffers[0][:, : B + n], buffers[1][:, : B + n]
        start = (other.start.to(self.start.device) + offset).repeat(copies)
        self.start = torch.cat((self.start, start))
        self.padded = bool(self.start.any())
