"""Data tests: reading a data directory (load_meta, open_split), batch sampling and its resumable state."""

import json

import numpy as np
import pytest
import torch

from slmkit.data import TokenBatches, eval_batches, load_meta, open_split
from slmkit.errors import SlmError
from slmkit.prepare import prepare

from test_prepare import make_docs, write_txt


def test_load_meta_and_open_split_errors(tmp_path):
    with pytest.raises(SlmError, match="run slm prepare first"):
        load_meta(tmp_path / "missing")
    with pytest.raises(SlmError, match="no meta.json.*run slm prepare first"):
        open_split(tmp_path, "train")
    f = write_txt(tmp_path / "corpus.txt", make_docs(10))
    prepare([str(f)], tmp_path / "d", vocab_size=300)
    with open(tmp_path / "d" / "train.bin", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(SlmError, match=r"train\.bin is missing or incomplete"):
        open_split(tmp_path / "d", "train")
    (tmp_path / "d" / "meta.json").write_text("{")
    with pytest.raises(SlmError, match="corrupt"):
        load_meta(tmp_path / "d")


# --- batches ------------------------------------------------------------------------------------

# Token value == position, so every window is identified by its first token.
TOKENS = np.arange(1000, dtype=np.uint16)


def window_starts(sampler: TokenBatches, n_batches: int) -> list[int]:
    return [int(s) for _ in range(n_batches) for s in sampler.next_batch()[0][:, 0]]


def test_batches_shapes_and_shift():
    x, y = TokenBatches(TOKENS, block_size=8, batch_size=4, seed=0).next_batch()
    assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(y, x + 1)  # y is x shifted by one token


def test_every_window_once_per_epoch_and_reshuffled():
    s = TokenBatches(TOKENS, block_size=8, batch_size=5, seed=3)
    w = s.windows_per_epoch
    assert w == (1000 - 8) // 8
    starts = window_starts(s, 2 * w // 5 + 1)  # the batch size does not divide w: spill over
    orders = []
    for ep in (starts[:w], starts[w : 2 * w]):
        off = ep[0] % 8
        assert off < 8 and all(st % 8 == off for st in ep)  # one offset per epoch
        orders.append([(st - off) // 8 for st in ep])
        assert sorted(orders[-1]) == list(range(w))  # every window exactly once
        assert max(ep) + 9 <= len(TOKENS)
    assert orders[0] != orders[1]
    assert s.state_dict()["epoch"] == 2


def test_state_dict_resumes_exactly():
    a = TokenBatches(TOKENS, block_size=16, batch_size=7, seed=11)
    for _ in range(13):  # past the first epoch boundary (61 windows)
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    assert set(state) == {"epoch", "cursor", "seed"}
    expected = [a.next_batch() for _ in range(12)]
    b = TokenBatches(TOKENS, block_size=16, batch_size=7, seed=999)
    b.load_state_dict(state)
    for x, y in expected:
        bx, by = b.next_batch()
        assert torch.equal(bx, x) and torch.equal(by, y)
    with pytest.raises(SlmError, match="changed since the checkpoint"):
        b.load_state_dict({"epoch": 0, "cursor": 10_000, "seed": 11})


def test_ranks_split_the_global_batch():
    full = TokenBatches(TOKENS, block_size=8, batch_size=6, seed=5)
    ranks = [TokenBatches(TOKENS, block_size=8, batch_size=3, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(50):  # several epochs
        x, _ = full.next_batch()
        assert torch.equal(ranks[0].next_batch()[0], x[0::2])
        assert torch.equal(ranks[1].next_batch()[0], x[1::2])
    assert ranks[0].state_dict() == ranks[1].state_dict() == full.state_dict()
    # Resuming on one process with the same global batch continues the same windows.
    single = TokenBatches(TOKENS, block_size=8, batch_size=6, seed=0)
    single.load_state_dict(ranks[0].state_dict())
    assert torch.equal(single.next_batch()[0], full.next_batch()[0])


def test_sampler_tiny_and_too_short_splits():
    s = TokenBatches(TOKENS[:9], block_size=8, batch_size=3, seed=0)  # exactly one window
    x, y = s.next_batch()
    assert s.windows_per_epoch == 1 and torch.equal(x, torch.arange(8).repeat(3, 1))
    with pytest.raises(SlmError, match="8 tokens but the context is 8.*smaller model.block_size"):
        TokenBatches(TOKENS[:8], block_size=8, batch_size=3, seed=0)
    with pytest.raises(SlmError, match="5 tokens"):
        eval_batches(TOKENS[:5], block_size=8, batch_size=2)


def test_different_seeds_differ():
    a = window_starts(TokenBatches(TOKENS, 8, 4, seed=1), 5)
    b = window_starts(TokenBatches(TOKENS, 8, 4, seed=2), 5)
    assert a != b


def test_eval_batches_sequential_and_repeatable():
    batches = list(eval_batches(TOKENS, block_size=10, batch_size=32))
    assert [len(x) for x, _ in batches] == [32, 32, 32, 3]  # 99 windows, the last batch short
    starts = torch.cat([x[:, 0] for x, _ in batches]).tolist()
    assert starts == list(range(0, 990, 10))
    assert all(torch.equal(y, x + 1) for x, y in batches)
    again = list(eval_batches(TOKENS, block_size=10, batch_size=32))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    first2 = list(eval_batches(TOKENS, block_size=10, batch_size=32, max_batches=2))
    assert len(first2) == 2 and torch.equal(first2[1][0], batches[1][0])
