"""slmkit.prepare_chat: the SFT DATA_DIR that ``slm prepare`` writes from chat records, and the
batches read from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_chat import RECORDS, STORY, supervised_text, write_jsonl

from slmkit import chat
from slmkit.errors import SlmError


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A fresh (untrained) tiny run: all ``--tokenizer-from`` needs is its tokenizer and config."""
    from slmkit.model import GPT, ModelConfig
    from slmkit.rundir import create_run
    from slmkit.tokenizer import train_bpe
    from slmkit.trainer import TrainConfig

    base = train_bpe(STORY, 300)
    model = GPT(ModelConfig(vocab_size=base.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16))
    return create_run(tmp_path_factory.mktemp("base") / "run", model, base, TrainConfig())


def chat_records(n: int) -> list[dict]:
    """Many small records of every form, answers varying so examples differ in length."""
    out = []
    for i in range(n):
        r = json.loads(json.dumps(RECORDS[i % len(RECORDS)]))
        if "completion" in r:
            r["completion"] += " Very happy." * (i % 4)
        out.append(r)
    return out


def test_slm_prepare_writes_an_sft_data_dir(tmp_path, base_run, capsys):
    from slmkit.cli import main
    from slmkit.data import ChatBatches, chat_eval_batches, load_meta, open_chat_split
    from slmkit.tokenizer import load_tokenizer

    path = write_jsonl(tmp_path / "chat.jsonl", chat_records(40))
    out = tmp_path / "sft"
    assert main(["prepare", "--input", str(path), "--tokenizer-from", str(base_run), "--out", str(out),
                 "--show", "2", "--val-fraction", "0.1"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("--- example") == 2 and printed.count("[[") >= 2 and "<|assistant|>[[" in printed
    assert "found 16 alpaca, 8 messages, 8 prompt/completion, 8 sharegpt records" in printed
    meta = load_meta(out)
    assert meta["kind"] == "chat" and meta["template"] == chat.DEFAULT_TEMPLATE and meta["context"] == 64
    assert meta["chat_template"] == chat.chat_template_jinja()
    assert meta["train"]["examples"] + meta["val"]["examples"] == 40 and meta["val"]["examples"] == 4
    tok = load_tokenizer(out)
    assert meta["vocab_size"] == tok.vocab_size == meta["base_vocab_size"] + 4
    train = open_chat_split(out, "train")
    assert len(train) == 36 and int(train.mask.sum()) == meta["train"]["supervised"]

    # Every example's supervised targets decode to exactly its assistant turns (+ end), none cut here.
    assert meta["train"]["cut"] == meta["train"]["skipped"] == 0
    convs, _ = chat.read_chat_jsonl(path)
    want = sorted("".join(c + "<|end|>" for r, c in t if r == "assistant") for t in convs)
    batches = ChatBatches(train, block_size=64, batch_size=4, seed=3, pad_id=tok.eot_id)
    got = []
    for _ in range(9):  # one epoch: 36 examples
        x, y = batches.next_batch()
        assert x.shape == y.shape and x.shape[1] <= 64 and x.dtype == torch.int64
        for row_x, row_y in zip(x, y):
            got.append(tok.decode(row_y[row_y >= 0].tolist()))
            n = int((row_y >= 0).nonzero().max()) + 1  # inputs agree with targets shifted by one
            assert torch.equal(row_x[1:n], torch.where(row_y[: n - 1] >= 0, row_y[: n - 1], row_x[1:n]))
    assert batches.state_dict() == {"epoch": 1, "cursor": 0, "seed": 3}
    assert len(got) == 36 and set(got) <= set(want)
    val_got = [tok.decode(y[y >= 0].tolist()) for _, ys in chat_eval_batches(open_chat_split(out, "val"), 64, 3,
                                                                                tok.eot_id) for y in ys]
    assert sorted(got + val_got) == want

    # Exact resume: a fresh source loaded with the state continues with the same batches.
    for _ in range(3):
        batches.next_batch()
    state = json.loads(json.dumps(batches.state_dict()))
    ahead = [batches.next_batch() for _ in range(12)]  # crosses into the next epoch
    resumed = ChatBatches(train, block_size=64, batch_size=4, seed=0, pad_id=tok.eot_id)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(ahead, [resumed.next_batch() for _ in range(12)]):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    with pytest.raises(SlmError, match="does not fit"):
        resumed.load_state_dict({"epoch": 0, "cursor": 36, "seed": 3})

    # Two ranks of the same global batch together see one rank's batch.
    whole = ChatBatches(train, 64, 4, seed=5, pad_id=tok.eot_id).next_batch()
    ranks = [ChatBatches(train, 64, 2, seed=5, pad_id=tok.eot_id, rank=r, world_size=2).next_batch() for r in (0, 1)]
    assert torch.equal(torch.stack([ranks[0][1], ranks[1][1]], 1).reshape(4, -1), whole[1])


def test_train_on_last_and_long_conversations(tmp_path, base_run, capsys):
    from slmkit.cli import main
    from slmkit.data import load_meta, open_chat_split
    from slmkit.tokenizer import load_tokenizer

    long = {"messages": [{"role": "user", "content": "Tell me. " * 30},
                         {"role": "assistant", "content": "Tom had a ball."}]}  # the prompt alone is over 56 tokens
    cut = {"messages": [{"role": "user", "content": "Hi?"},
                        {"role": "assistant", "content": "Tom had a red ball. " * 10}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [RECORDS[0]] * 6 + [long, cut])
    val = write_jsonl(tmp_path / "val.jsonl", [RECORDS[1]])
    out = tmp_path / "sft"
    assert main(["prepare", "--input", str(path), "--val-input", str(val), "--tokenizer-from", str(base_run),
                 "--out", str(out), "--train-on", "last", "--context", "56"]) == 0
    assert "cut 1 skipped 1 (context 56)" in capsys.readouterr().out
    meta = load_meta(out)
    assert meta["train_on"] == "last" and meta["train"]["examples"] == 7 and meta["val"]["examples"] == 1
    split = open_chat_split(out, "train")
    lengths = np.diff(split.offsets)
    assert lengths.max() == 57 and sorted(lengths)[-2] == 55
    ids, mask = split.example(0)
    assert supervised_text(ids.tolist(), mask.tolist(), load_tokenizer(out)) == ["Lily liked it.<|end|>"]


def test_prepare_refuses_bad_chat_input(tmp_path, base_run, capsys):
    from slmkit.cli import main
    from slmkit.tokenizer import train_bpe

    good = write_jsonl(tmp_path / "chat.jsonl", RECORDS * 2)
    out = tmp_path / "sft"
    assert main(["prepare", "--input", str(good), "--out", str(out)]) == 2
    assert "pass --tokenizer-from BASE_RUN" in capsys.readouterr().err and not out.exists()
    data_only = tmp_path / "tokonly"
    chat.add_chat_tokens(train_bpe(STORY, 300)).save(data_only)
    assert main(["prepare", "--input", str(good), "--tokenizer-from", str(data_only), "--out", str(out)]) == 2
    assert "pass --context N" in capsys.readouterr().err and not out.exists()
    assert main(["prepare", "--input", str(good), "--tokenizer-from", str(base_run), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = write_jsonl(tmp_path / "bad.jsonl", RECORDS + [{"prompt": "p", "completion": ""}])
    assert main(["prepare", "--input", str(bad), "--tokenizer-from", str(base_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{bad} line 6 has an empty assistant turn" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing overwritten
