"""Automatic prefix caching: the keys and values of prompts already run, found again by their tokens.

The key and value of position ``j`` depend only on tokens ``0..j``, so the keys and values of a
prompt's first ``p`` tokens are those of any other prompt that starts with the same ``p`` tokens:
a new prompt that shares an opening with an earlier one (a chat's system prompt and past turns,
sent again every turn; stories that all begin "Once upon a time") need not run those tokens again.

``PrefixCache`` is a radix tree over token ids (as SGLang's radix cache): every node holds a run of
tokens and their keys and values, its children the different ways the text goes on. Matching is
token by token, so a shared opening of any length counts (fixed blocks of 16 tokens would miss the
short openings most prompts share). A prompt is inserted once it has been fully run through the
model, only its part not yet in the tree copied. The tree holds at most ``budget`` bytes; past that
the least recently used leaves go first (a leaf: no longer prompt goes on from it, so a prefix
stays as long as anything that extends it).
"""

from __future__ import annotations

import heapq
import itertools

import torch


class _Node:
    """A run of tokens following its parent's, with their keys and values (n_layer, n_kv, len, head_dim)."""

    __slots__ = ("tokens", "k", "v", "parent", "children", "used")

    def __init__(self, tokens: tuple[int, ...], k: torch.Tensor | None, v: torch.Tensor | None,
                 parent: _Node | None) -> None:
        self.tokens, self.k, self.v, self.parent = tokens, k, v, parent
        self.children: dict[int, _Node] = {}  # first token -> child
        self.used = 0  # the tick of its last match or insert

    @property
    def nbytes(self) -> int:
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes

    def split(self, m: int) -> None:
        """Keep the first ``m`` tokens here and move the rest into a new only child."""
        tail = _Node(self.tokens[m:], self.k[:, :, m:].clone(), self.v[:, :, m:].clone(), self)
        tail.children, tail.used = self.children, self.used
        for child in tail.children.values():
            child.parent = tail
        self.tokens, self.children = self.tokens[:m], {tail.tokens[0]: tail}
        self.k, self.v = self.k[:, :, :m].clone(), self.v[:, :, :m].clone()  # clones: the tail's bytes are freed with it


def _common(a: tuple[int, ...], b: list[int], start: int) -> int:
    """How many tokens ``a`` and ``b[start:]`` share at their start."""
    n = min(len(a), len(b) - start)
    if a[:n] == tuple(b[start : start + n]):
        return n
    return next(i for i in range(n) if a[i] != b[start + i])


class PrefixCache:
    """Keys and values of prompt prefixes by their token ids (see the module docstring), at most
    ``budget`` bytes. ``hit_tokens`` / ``query_tokens`` count the prompt tokens found / looked up."""

    def __init__(self, budget: int) -> None:
        if budget < 0:
            raise ValueError(f"the prefix cache's budget must be >= 0 bytes, got {budget}")
        self.budget = budget
        self.nbytes = 0
        self.hit_tokens = 0
        self.query_tokens = 0
        self._root = _Node((), None, None, None)
        self._tick = itertools.count(1)
        self._layout: tuple | None = None  # (dtype, device, n_layer, n_kv, head_dim) of the first insert

    def match(self, tokens: list[int]) -> int:
        """The longest cached prefix of ``tokens``, at most ``len(tokens) - 1`` tokens (the last
        prompt token must still run: its logits pick the first new token). Changes nothing."""
        return sum(m for _, m in self._walk(tokens, len(tokens) - 1))

    def lookup(self, tokens: list[int], limit: int | None = None) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        """``(p, k, v)``: the longest cached prefix of ``tokens`` (at most ``len(tokens) - 1`` and
        ``limit`` tokens) and its keys and values (n_layer, n_kv, p, head_dim), copies (None when
        p is 0). Counts ``len(tokens)`` looked up and ``p`` found; the prefix becomes the most
        recently used."""
        cap = len(tokens) - 1 if limit is None else min(limit, len(tokens) - 1)
        path = self._walk(tokens, cap)
        tick = next(self._tick)
        for node, _ in path:
            node.used = tick
        p = sum(m for _, m in path)
        self.query_tokens += len(tokens)
        self.hit_tokens += p
        if not p:
            return 0, None, None
        k = torch.cat([node.k[:, :, :m] for node, m in path], 2)
        v = torch.cat([node.v[:, :, :m] for node, m in path], 2)
        return p, k, v

    def insert(self, tokens: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Remember the keys and values ``k``, ``v`` (n_layer, n_kv, len(tokens), head_dim) of
        ``tokens`` run from position 0; only the part not cached yet is copied. Then the least
        recently used leaves go until the cache fits its budget."""
        if k.shape != v.shape or k.dim() != 4 or k.size(2) != len(tokens):
            raise ValueError(f"keys {tuple(k.shape)} and values {tuple(v.shape)} do not hold {len(tokens)} tokens")
        layout = (k.dtype, k.device, k.size(0), k.size(1), k.size(3))
        if self._layout is None:
            self._layout = layout
        elif layout != self._layout:
            raise ValueError(f"the prefix cache holds {self._layout}, not {layout}: one model and KV dtype per cache")
        tick = next(self._tick)
        node, i = self._root, 0
        while i < len(tokens):
            node.used = tick
            child = node.children.get(tokens[i])
            if child is None:
                leaf = _Node(tuple(tokens[i:]), k[:, :, i:].clone(), v[:, :, i:].clone(), node)
                leaf.used = tick
                node.children[tokens[i]] = leaf
                self.nbytes += leaf.nbytes
                break
            m = _common(child.tokens, tokens, i)
            if m < len(child.tokens):
                child.split(m)
            node, i = child, i + m
        node.used = tick
        self._evict()

    def _walk(self, tokens: list[int], cap: int) -> list[tuple[_Node, int]]:
        """The nodes along the longest cached prefix of ``tokens[:cap]`` and how many tokens of each match."""
        path, node, i = [], self._root, 0
        while i < cap:
            child = node.children.get(tokens[i])
            if child is None:
                break
            m = min(_common(child.tokens, tokens, i), cap - i)
            path.append((child, m))
            if m < len(child.tokens):
                break
            node, i = child, i + m
        return path

    def _evict(self) -> None:
        """Over budget: drop least recently used leaves down to 90% of it, so that the walk over
        every node this takes comes once per many inserts, not on each one once the cache is full."""
        if self.nbytes <= self.budget:
            return
        leaves = [(n.used, id(n), n) for n in self._nodes() if not n.children]
        heapq.heapify(leaves)
        while self.nbytes > 0.9 * self.budget and leaves:
            _, _, leaf = heapq.heappop(leaves)
            parent = leaf.parent
            del parent.children[leaf.tokens[0]]
            self.nbytes -= leaf.nbytes
            if parent is not self._root and not parent.children:  # a leaf now itself
                heapq.heappush(leaves, (parent.used, id(parent), parent))

    def _nodes(self) -> list[_Node]:
        out, todo = [], list(self._root.children.values())
        while todo:
            node = todo.pop()
            out.append(node)
            todo += node.children.values()
        return out
