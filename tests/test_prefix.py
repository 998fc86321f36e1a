"""The prefix cache (generate/prefix.py): token-level longest match, copies of the right keys and
values, a prefix never the whole prompt, the byte budget with least-recently-used eviction, counts."""

from __future__ import annotations

import pytest
import torch

from slmkit.generate.prefix import PrefixCache


def kv(tokens: list[int], tag: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (1 layer, 1 head, len, 1) that say which insert and position they came from."""
    k = torch.tensor([tag + i for i in range(len(tokens))], dtype=torch.float32).view(1, 1, -1, 1)
    return k, -k


def test_longest_match_token_by_token_with_the_inserted_keys_and_values():
    cache = PrefixCache(1 << 20)
    cache.insert([1, 2, 3, 4], *kv([1, 2, 3, 4], 100))
    cache.insert([1, 2, 7], *kv([1, 2, 7], 200))  # splits the first run after two tokens
    p, k, v = cache.lookup([1, 2, 3, 9])
    assert p == 3 and k.flatten().tolist() == [100, 101, 102] and torch.equal(v, -k)
    p, k, _ = cache.lookup([1, 2, 7, 7, 7])
    assert p == 3 and k.flatten().tolist() == [100, 101, 202]  # tokens 1, 2 were cached by the first insert
    assert cache.lookup([1, 2, 3, 4, 5])[0] == 4
    assert cache.lookup([5, 1, 2])[:2] == (0, None)
    assert cache.lookup([1, 2, 3, 4, 5], limit=2)[0] == 2
    assert (cache.hit_tokens, cache.query_tokens) == (3 + 3 + 4 + 0 + 2, 4 + 5 + 5 + 3 + 5)


def test_a_prefix_is_never_the_whole_prompt():
    cache = PrefixCache(1 << 20)
    cache.insert([1, 2, 3], *kv([1, 2, 3], 0))
    assert cache.match([1, 2, 3]) == 2 and cache.lookup([1, 2, 3])[0] == 2  # the last token must run
    assert cache.match([1]) == 0 and cache.match([1, 2, 3, 4]) == 3


def test_the_budget_evicts_the_least_recently_used_leaves():
    cache = PrefixCache(80)  # 8 bytes a token (float32 key and value): two 4-token prompts fit, three do not
    a, b, c = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
    cache.insert(a, *kv(a, 0))
    cache.insert(b, *kv(b, 0))
    assert cache.nbytes == 64
    cache.lookup(a + [0])  # a is used again: b is now the least recently used
    cache.insert(c, *kv(c, 0))
    assert cache.nbytes == 64 and cache.match(a + [0]) == 4 and cache.match(c + [0]) == 4 and cache.match(b + [0]) == 0
    # a shared prefix stays while a prompt that extends it does; once its last leaf goes, it is a leaf itself
    cache = PrefixCache(70)
    cache.insert([1, 2, 3, 4, 5, 6], *kv([1] * 6, 0))
    cache.insert([1, 2, 3, 7], *kv([1] * 4, 0))  # 7 tokens held: (1, 2, 3) then (4, 5, 6) or (7)
    cache.insert([8, 9], *kv([8, 9], 0))  # 72 bytes > 70: the oldest leaf (4, 5, 6) goes
    assert cache.match([1, 2, 3, 4, 5, 6, 0]) == 3 and cache.match([1, 2, 3, 7, 0]) == 4 and cache.nbytes == 48


def test_bad_inserts_are_refused():
    cache = PrefixCache(1 << 20)
    with pytest.raises(ValueError, match="do not hold 3 tokens"):
        cache.insert([1, 2, 3], *kv([1, 2], 0))
    cache.insert([1, 2], *kv([1, 2], 0))
    k, v = kv([3, 4], 0)
    with pytest.raises(ValueError, match="one model and KV dtype"):
        cache.insert([3, 4], k.to(torch.bfloat16), v.to(torch.bfloat16))
    with pytest.raises(ValueError, match=">= 0 bytes"):
        PrefixCache(-1)
