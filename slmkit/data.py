"""Data: read a data directory made by ``slm prepare`` (``slmkit.prepare``) and sample batches from it.

A data directory (``DATA_DIR``) holds::

    train.bin, val.bin     every document's tokens followed by <|endoftext|>, flat uint16/uint32
    meta.json              vocab_size, dtype, tokenizer, eot_id, per-split counts, sources
    tokenizer.json | encoder.json + vocab.bpe, tokenizer_meta.json   (see tokenizer.py)

An SFT DATA_DIR (``"kind": "chat"`` in meta.json, written by ``slmkit.chat``) adds per split
``<split>_mask.bin`` (uint8, 1 = supervised target) and ``<split>_offsets.bin`` (int64 example
boundaries); ``open_chat_split`` and ``ChatBatches`` read it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from slmkit.errors import SlmError

SPLITS = ("train", "val")
DATA_META = "meta.json"  # the file that marks a folder as a data directory


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """The element type of train.bin/val.bin: uint16 while every id fits, else uint32."""
    return np.uint32 if vocab_size > 65535 else np.uint16


# --- reading a data directory -------------------------------------------------------------------


def load_meta(data_dir: str | Path) -> dict:
    """The ``meta.json`` of a data directory made by ``prepare``."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise SlmError(f"data directory {data_dir} does not exist: run slm prepare first")
    path = data_dir / DATA_META
    if not path.is_file():
        raise SlmError(f"{data_dir} has no meta.json (not a prepared data directory): run slm prepare first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        for key in ("vocab_size", "dtype", "eot_id", "train", "val"):
            meta[key]  # noqa: B018 - only checking that the key is there
        if np.dtype(meta["dtype"]) not in (np.uint16, np.uint32):
            raise ValueError("dtype")
        if not all(isinstance(meta[s]["tokens"], int) and meta[s]["tokens"] >= 0 for s in SPLITS):
            raise ValueError("tokens")
    except (ValueError, KeyError, TypeError):
        raise SlmError(f"{path} is corrupt: run slm prepare again") from None
    return meta


def open_split(data_dir: str | Path, split: str) -> np.memmap:
    """A read-only memmap of ``train.bin`` or ``val.bin``."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    meta = load_meta(data_dir)
    dtype = np.dtype(meta["dtype"])
    n = meta[split]["tokens"]
    path = Path(data_dir) / f"{split}.bin"
    if n == 0 or not path.is_file() or path.stat().st_size != n * dtype.itemsize:
        raise SlmError(f"{path} is missing or incomplete: run slm prepare first")
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def check_context_fits(data_dir: str | Path, meta: dict, block_size: int) -> None:
    """Refuse, before any work, a context longer than a split: one window needs block_size + 1 tokens."""
    for split in SPLITS:
        n = meta[split]["tokens"]
        if n < block_size + 1:
            raise SlmError(
                f"the {split} split of {data_dir} has {n} tokens but model.block_size is {block_size} "
                f"(a window needs {block_size + 1}): use a smaller model.block_size or more data"
            )


# --- batches ------------------------------------------------------------------------------------


def _too_short(n: int, block_size: int) -> SlmError:
    return SlmError(
        f"the split has {n} tokens but the context is {block_size} (a window needs {block_size + 1}): "
        "use a smaller model.block_size or more data"
    )


def _windows_to_xy(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + np.arange(block_size + 1)  # one gather instead of a Python loop
    w = tokens[idx].astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(w[:, :-1])), torch.from_numpy(np.ascontiguousarray(w[:, 1:]))


class TokenBatches:
    """Yields (x, y) int64 torch tensors of shape (batch, block) from a token memmap.

    Epoch e: the stream is cut into non-overlapping windows of block+1 tokens (consecutive
    windows share the boundary token: window i covers [off + i*block, off + i*block + block + 1)),
    with an offset ``off`` in [0, block) drawn from (seed, epoch), and the windows are visited in a
    permutation drawn from (seed, epoch). Every epoch has the same ``windows_per_epoch`` (the count
    that fits for any offset). State = (epoch, cursor), cursor = windows consumed this epoch; a
    batch that runs past the end of an epoch continues into the next, so batches are always full.

    With DDP the global batch is ``batch_size * world_size`` consecutive windows, of which this rank
    takes every ``world_size``-th starting at ``rank``; the cursor advances by the global batch, so a
    resume with a different world size but the same global batch sees the same windows.
    """

    def __init__(
        self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if block_size < 1 or batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler settings: block={block_size} batch={batch_size} rank={rank}/{world_size}")
        n = len(tokens)
        if n < block_size + 1:
            raise _too_short(n, block_size)
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        # Offsets are limited so at least one window always fits, even in a tiny split.
        self._max_off = min(block_size, n - block_size)
        self._windows = (n - self._max_off) // block_size
        self.epoch = 0
        self.cursor = 0
        self._plan_cache: tuple[int, int, np.ndarray] | None = None

    @property
    def windows_per_epoch(self) -> int:
        return self._windows

    def _plan(self, epoch: int) -> tuple[int, np.ndarray]:
        """The offset and window order of ``epoch`` (cached, since it is reused every batch)."""
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            off = int(rng.integers(0, self._max_off))
            self._plan_cache = (epoch, off, rng.permutation(self._windows))
        return self._plan_cache[1], self._plan_cache[2]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) for this rank, with y the tokens following x."""
        need = self.batch_size * self.world_size
        starts = np.empty(need, dtype=np.int64)
        filled = 0
        while filled < need:
            off, perm = self._plan(self.epoch)
            take = min(need - filled, self._windows - self.cursor)
            starts[filled : filled + take] = off + perm[self.cursor : self.cursor + take] * self.block_size
            filled += take
            self.cursor += take
            if self.cursor == self._windows:
                self.epoch, self.cursor = self.epoch + 1, 0
        return _windows_to_xy(self.tokens, starts[self.rank :: self.world_size], self.block_size)

    def state_dict(self) -> dict:
        """``{"epoch", "cursor", "seed"}``: enough to resume the exact same batch sequence."""
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    @staticmethod
    def start_state(seed: int) -> dict:
        """The ``state_dict()`` of a sampler with ``seed`` that has given no batch yet (a new run's)."""
        return {"epoch": 0, "cursor": 0, "seed": seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a ``state_dict()``, including its seed."""
        epoch, cursor, seed = int(state["epoch"]), int(state["cursor"]), int(state["seed"])
        if not 0 <= cursor < self._windows or epoch < 0:
            raise SlmError(
                f"the saved data position (epoch {epoch}, window {cursor}) does not fit this split's "
                f"{self._windows} windows: the data or block_size changed since the checkpoint"
            )
        self.epoch, self.cursor, self.seed = epoch, cursor, seed
        self._plan_cache = None


# --- chat / instruction examples (an SFT DATA_DIR, see slmkit/chat.py) ----------------------------


class ChatSplit:
    """One split of an SFT DATA_DIR, memory-mapped: ``tokens``, ``mask`` (1 = supervised target) and
    ``offsets`` (example i is ``tokens[offsets[i]:offsets[i + 1]]``)."""

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, offsets: np.ndarray) -> None:
        self.tokens, self.mask, self.offsets = tokens, mask, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tokens[a:b], self.mask[a:b]


def open_chat_split(data_dir: str | Path, split: str) -> ChatSplit:
    """The ``split`` of an SFT DATA_DIR (``"kind": "chat"`` in meta.json), its sizes checked."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    if meta.get("kind") != "chat":
        raise SlmError(f"{data_dir} holds plain text, not chat examples: prepare chat/instruction records")
    dtype, n, m = np.dtype(meta["dtype"]), meta[split]["tokens"], meta[split].get("examples")
    paths = {name: data_dir / f"{split}{name}.bin" for name in ("", "_mask", "_offsets")}
    sizes = {"": n * dtype.itemsize, "_mask": n, "_offsets": (m + 1) * 8 if isinstance(m, int) else -1}
    if not all(p.is_file() and p.stat().st_size == sizes[k] for k, p in paths.items()) or not m:
        raise SlmError(f"the {split} split of {data_dir} is missing or incomplete: run slm prepare again")
    offsets = np.fromfile(paths["_offsets"], dtype=np.int64)
    if offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) < 2):
        raise SlmError(f"{paths['_offsets']} is corrupt: run slm prepare again")
    tokens = np.memmap(paths[""], dtype=dtype, mode="r", shape=(n,))
    return ChatSplit(tokens, np.memmap(paths["_mask"], dtype=np.uint8, mode="r", shape=(n,)), offsets)


def _pad_examples(split: ChatSplit, order: np.ndarray, block_size: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y for whole examples, right-padded to the longest: y is the next token where supervised, else -1."""
    x, y, _ = _rows(split, [[int(i)] for i in order], block_size, pad_id)
    return x, y


def _rows(split: ChatSplit, rows: list[list[int]], block_size: int,
          pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, y, segments for rows of examples laid end to end (one example a row when padding), each
    row right-padded to the longest (at most ``block_size`` inputs). y is the next token where it
    is supervised, else -1 (an example's first token never is, so no target crosses two examples);
    segments numbers the examples of a row from 0, padding taking the next number."""
    lengths = [sum(int(split.offsets[i + 1] - split.offsets[i]) for i in row) for row in rows]
    width = min(block_size, max(lengths) - 1)
    x = np.full((len(rows), width), pad_id, dtype=np.int64)
    y = np.full((len(rows), width), -1, dtype=np.int64)
    seg = np.zeros((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        parts = [split.example(i) for i in row]
        tokens = np.concatenate([t for t, _ in parts])[: width + 1].astype(np.int64)
        mask = np.concatenate([m for _, m in parts])[: width + 1].astype(bool)
        ids = np.repeat(np.arange(len(parts)), [len(t) for t, _ in parts])[: width + 1]
        n = len(tokens) - 1
        x[r, :n] = tokens[:-1]
        y[r, :n] = np.where(mask[1:], tokens[1:], -1)
        seg[r, :n], seg[r, n:] = ids[:-1], len(parts)
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(seg)


def pack_best_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit packing: each item (in the given order) goes into the open bin it fills most
    tightly, or a new bin; returns the bins as lists of item indices. Items longer than
    ``capacity`` get a bin of their own."""
    import bisect

    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin number), sorted
    for i, n in enumerate(lengths.tolist()):
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, b = free.pop(at)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return bins


class ChatBatches:
    """Yields batches of whole examples from a ``ChatSplit``: (x, y) padded, one example a row, or
    (x, y, segments) packed, several examples a row.

    y holds the next token where that token is supervised and -1 on prompts and padding (x is
    padded with ``pad_id``, which is never a target). Epoch e visits the examples in a permutation
    drawn from (seed, epoch). Packed (``pack=True``), that order is packed best-fit into rows of
    ``block_size + 1`` tokens (an example of n tokens fills n of them: its last token is only a
    target), and the rows are visited in an order drawn from (seed, epoch) too; ``segments`` says
    which example each token belongs to, so the model keeps attention and positions inside each
    (``GPT.forward``). A unit (an example, or a packed row) is a row of the batch; state = (epoch,
    cursor over units) as in ``TokenBatches``, a batch running past an epoch's end continuing into
    the next. With DDP this rank takes every ``world_size``-th row of the global batch, and all
    ranks pad to the global batch's longest, so their shapes agree.
    """

    def __init__(self, split: ChatSplit, block_size: int, batch_size: int, seed: int, pad_id: int,
                 rank: int = 0, world_size: int = 1, pack: bool = False) -> None:
        if block_size < 1 or batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler settings: block={block_size} batch={batch_size} rank={rank}/{world_size}")
        if len(split) == 0:
            raise SlmError("the split has no examples: run slm prepare on more records")
        self.split, self.block_size, self.batch_size, self.pad_id = split, block_size, batch_size, pad_id
        self.seed, self.rank, self.world_size, self.pack = seed, rank, world_size, pack
        self.epoch = self.cursor = 0
        self._units: tuple[int, list[list[int]]] | None = None

    def _epoch_units(self, epoch: int) -> list[list[int]]:
        """The rows of ``epoch``, each a list of example indices (cached: reused every batch)."""
        if self._units is None or self._units[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(len(self.split))
            if self.pack:
                lengths = np.diff(self.split.offsets)[perm]
                bins = pack_best_fit(lengths, self.block_size + 1)
                units = [[int(perm[j]) for j in bins[b]] for b in rng.permutation(len(bins))]
            else:
                units = [[int(i)] for i in perm]
            self._units = (epoch, units)
        return self._units[1]

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """The next (x, y) for this rank, or (x, y, segments) when packing."""
        need, picked = self.batch_size * self.world_size, []
        while len(picked) < need:
            units = self._epoch_units(self.epoch)
            take = min(need - len(picked), len(units) - self.cursor)
            picked += units[self.cursor : self.cursor + take]
            self.cursor += take
            if self.cursor == len(units):
                self.epoch, self.cursor = self.epoch + 1, 0
        x, y, seg = _rows(self.split, picked, self.block_size, self.pad_id)
        mine = slice(self.rank, None, self.world_size)
        return (x[mine], y[mine], seg[mine]) if self.pack else (x[mine], y[mine])

    def state_dict(self) -> dict:
        """``{"epoch", "cursor", "seed"}``: enough to resume the exact same batch sequence."""
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a ``state_dict()``, including its seed."""
        epoch, cursor, seed = int(state["epoch"]), int(state["cursor"]), int(state["seed"])
        self.seed, self._units = seed, None
        if epoch < 0 or not 0 <= cursor < len(self._epoch_units(epoch)):
            raise SlmError(
                f"the saved data position (epoch {epoch}, row {cursor}) does not fit this split's "
                f"{len(self._epoch_units(epoch))} rows: the data or finetune.pack changed since the checkpoint"
            )
        self.epoch, self.cursor = epoch, cursor


def chat_eval_batches(split: ChatSplit, block_size: int, batch_size: int, pad_id: int,
                      max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The split's examples in order, padded batches of ``batch_size`` (the last may be smaller)."""
    n_batches = math.ceil(len(split) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        yield _pad_examples(split, np.arange(b * batch_size, min(len(split), (b + 1) * batch_size)), block_size, pad_id)


def eval_batches(
    tokens: np.ndarray, block_size: int, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential non-overlapping windows from the start of ``tokens``, for exact repeatable evaluation.

    The last batch may be smaller; ``max_batches`` keeps just the first that many batches.
    """
    n = len(tokens)
    if n < block_size + 1:
        raise _too_short(n, block_size)
    windows = (n - 1) // block_size
    n_batches = math.ceil(windows / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)

    def gen() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in range(n_batches):
            starts = np.arange(b * batch_size, min(windows, (b + 1) * batch_size), dtype=np.int64) * block_size
            yield _windows_to_xy(tokens, starts, block_size)

    return gen()


__all__ = [
    "ChatBatches",
    "ChatSplit",
    "DATA_META",
    "SPLITS",
    "TokenBatches",
    "chat_eval_batches",
    "check_context_fits",
    "eval_batches",
    "load_meta",
    "open_chat_split",
    "open_split",
    "pack_best_fit",
    "token_dtype",
]
