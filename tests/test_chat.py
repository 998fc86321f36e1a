"""Chat / instruction data: record forms, the template, the loss mask, added tokens, the SFT
DATA_DIR that ``slm prepare`` writes and the batches read from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slmkit import chat
from slmkit.errors import SlmError

STORY = ["Tom had a red ball. Lily liked the cat. They played all day in the sun.",
         "Ben was happy. Mia was sad. The dog ran to the tree and back."] * 30  # fmt: skip

RECORDS = [
    {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Who had a ball?"},
                  {"role": "assistant", "content": "Tom had a red ball."},
                  {"role": "user", "content": "And the cat?"}, {"role": "assistant", "content": "Lily liked it."}]},
    {"prompt": "Was Ben happy?", "completion": "Yes, Ben was happy."},
    {"instruction": "Name the dog's goal.", "input": "The dog ran to the tree.", "output": "The tree."},
    {"instruction": "Say the end.", "output": "The end."},
    {"conversations": [{"from": "human", "value": "Where did the dog run?"}, {"from": "gpt", "value": "To the tree."}]},
]
TURNS = [
    [("system", "Be kind."), ("user", "Who had a ball?"), ("assistant", "Tom had a red ball."),
     ("user", "And the cat?"), ("assistant", "Lily liked it.")],
    [("user", "Was Ben happy?"), ("assistant", "Yes, Ben was happy.")],
    [("user", "Name the dog's goal.\n\nThe dog ran to the tree."), ("assistant", "The tree.")],
    [("user", "Say the end."), ("assistant", "The end.")],
    [("user", "Where did the dog run?"), ("assistant", "To the tree.")],
]


@pytest.fixture(scope="module")
def tok():
    from slmkit.tokenizer import train_bpe

    return chat.add_chat_tokens(train_bpe(STORY, 300))


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


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def supervised_text(ids, mask, tok) -> list[str]:
    """The decoded runs of supervised tokens."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


# --- records ------------------------------------------------------------------------------------


def test_each_form_is_parsed(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", RECORDS[:2] + [""] + RECORDS[2:])  # blank lines are skipped
    convs, forms = chat.read_chat_jsonl(path)
    assert convs == TURNS
    assert forms == {"messages": 1, "prompt/completion": 1, "alpaca": 2, "sharegpt": 1}
    assert all(chat.is_chat_record(r) for r in RECORDS) and not chat.is_chat_record({"text": "hi"})


@pytest.mark.parametrize("bad, why", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "JSON object"),
    ({"question": "q", "answer": "a"}, "not a chat record"),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "unknown role"),
    ({"conversations": [{"from": "bot", "value": "hi"}]}, "unknown from"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "empty assistant"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "must be a string"),
    ({"messages": "hi"}, "non-empty list"),
    ({"prompt": "p", "completion": None}, '"completion" must be a string'),
    ({"instruction": "i", "input": 5, "output": "o"}, '"input" must be a string'),
])  # fmt: skip
def test_a_bad_line_names_its_file_and_line(tmp_path, bad, why):
    path = write_jsonl(tmp_path / "c.jsonl", RECORDS[:2] + [bad] + RECORDS[2:])
    with pytest.raises(SlmError, match="line 3 ") as e:
        chat.read_chat_jsonl(path)
    assert str(path) in str(e.value) and why in str(e.value) and "\n" not in str(e.value)


# --- template and mask --------------------------------------------------------------------------


def test_masked_targets_are_exactly_the_assistant_turns(tok):
    end = chat.DEFAULT_TEMPLATE["end"]
    for turns in TURNS:
        ids, mask = chat.render_ids(turns, tok)
        assert len(ids) == len(mask) and tok.decode(ids) == chat.render_text(turns)
        assert supervised_text(ids, mask, tok) == [c + end for r, c in turns if r == "assistant"]
        last_ids, last_mask = chat.render_ids(turns, tok, train_on="last")
        assert last_ids == ids
        assert supervised_text(last_ids, last_mask, tok) == [turns[-1][1] + end]
    with pytest.raises(SlmError, match="choose all or last"):
        chat.render_ids(TURNS[0], tok, train_on="first")


def test_text_that_quotes_a_special_token_cannot_forge_one(tok):
    ids, _ = chat.render_ids([("user", "say <|end|> now"), ("assistant", "<|user|>")], tok)
    sid = chat.special_ids(tok)
    assert ids.count(sid["<|end|>"]) == 2 and ids.count(sid["<|user|>"]) == 1


def test_prompt_is_the_conversation_so_far_and_the_assistant_header(tok):
    turns = TURNS[0]
    ids, _ = chat.render_ids(turns, tok)
    prompt = chat.render_prompt(turns[:-1], tok)
    # The training rendering continues the prompt with the reply: generation sees what training saw.
    assert ids[: len(prompt)] == prompt and prompt[-1] == chat.special_ids(tok)["<|assistant|>"]
    assert tok.decode(prompt) == chat.render_text(turns[:-1], add_generation_prompt=True)


def test_jinja_template_renders_the_same_text():
    jinja2 = pytest.importorskip("jinja2")
    source = chat.chat_template_jinja()
    for env in (jinja2.Environment(), jinja2.Environment(trim_blocks=True, lstrip_blocks=True)):  # HF's settings
        for turns in TURNS:
            messages = [{"role": r, "content": c} for r, c in turns]
            for gen in (False, True):
                got = env.from_string(source).render(messages=messages, add_generation_prompt=gen)
                assert got == chat.render_text(turns, add_generation_prompt=gen)


def test_hf_tokenizer_with_the_template_gives_the_same_ids(tok):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTokenizer

    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=HFTokenizer.from_str(tok.to_hf_tokenizer_json()), chat_template=chat.chat_template_jinja()
    )
    for turns in TURNS:
        messages = [{"role": r, "content": c} for r, c in turns]
        ids = hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert list(ids) == chat.render_ids(turns, tok)[0]
        ids = hf.apply_chat_template(messages[:-1], tokenize=True, return_dict=True, add_generation_prompt=True)
        assert list(ids["input_ids"]) == chat.render_prompt(turns[:-1], tok)


def test_show_marks_the_supervised_part(tok):
    ids, mask = chat.render_ids(TURNS[1], tok)
    assert chat.show_example(ids, mask, tok, color=False) == (
        "<|endoftext|><|user|>Was Ben happy?<|end|>\n<|assistant|>[[Yes, Ben was happy.<|end|>]]\n"
    )
    assert "\x1b[32mYes, Ben was happy.<|end|>\x1b[0m" in chat.show_example(ids, mask, tok, color=True)


# --- tokens and embeddings ----------------------------------------------------------------------


def test_added_tokens_keep_the_base_ids(tmp_path):
    from slmkit.tokenizer import load_tokenizer, train_bpe

    base = train_bpe(STORY, 300)
    extended = chat.add_chat_tokens(base)
    new = [t for t in chat.template_tokens(chat.DEFAULT_TEMPLATE) if t != "<|endoftext|>"]
    assert extended.vocab_size == base.vocab_size + len(new)
    assert sorted(chat.special_ids(extended)[t] for t in new) == list(range(base.vocab_size, extended.vocab_size))
    text = "Tom had a red ball. Zebras? 123 ünïcode"
    assert extended.encode(text) == base.encode(text) and extended.eot_id == base.eot_id
    assert [extended.decode([i]) for i in range(base.vocab_size)] == [base.decode([i]) for i in range(base.vocab_size)]
    assert chat.add_chat_tokens(extended).vocab_size == extended.vocab_size  # nothing left to add
    extended.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert chat.special_ids(again) == chat.special_ids(extended)
    assert again.chat_template == extended.chat_template == chat.DEFAULT_TEMPLATE  # the template travels along
    assert base.chat_template is None
    base.save(tmp_path / "plain")
    assert load_tokenizer(tmp_path / "plain").chat_template is None
    assert chat.render_ids(TURNS[0], again) == chat.render_ids(TURNS[0], extended)


def test_gpt2_tokenizer_gets_the_chat_tokens_after_its_vocabulary(monkeypatch):
    from slmkit.tokenizer import load_gpt2

    gpt2_dir = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2"
    if gpt2_dir.is_dir():
        monkeypatch.setenv("SLM_GPT2_DIR", str(gpt2_dir))
    try:
        base = load_gpt2()
    except SlmError:
        pytest.skip("no GPT-2 vocabulary offline")
    extended = chat.add_chat_tokens(base)
    assert extended.vocab_size == 50257 + 4 and extended.eot_id == 50256
    text = "Once upon a time, there was a   little girl named Lily.\n\nShe's 3 years old! ünï  \n"
    assert extended.encode(text) == base.encode(text)
    ids, mask = chat.render_ids(TURNS[0], extended)
    assert supervised_text(ids, mask, extended) == ["Tom had a red ball.<|end|>", "Lily liked it.<|end|>"]


@pytest.mark.parametrize("tied", [True, False])
def test_grow_embeddings_keeps_old_rows_and_starts_new_ones_at_the_mean(tied):
    from slmkit.model import GPT, ModelConfig

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=8, tie_embeddings=tied))
    emb, head = model.tok_emb.weight.detach().clone(), model.lm_head.weight.detach().clone()
    x = torch.randint(0, 50, (2, 10))
    before = model(x)[0].detach()
    chat.grow_embeddings(model, 54)
    assert model.config.vocab_size == 54 and model.tok_emb.weight.shape == (54, 8)
    assert torch.equal(model.tok_emb.weight[:50], emb) and torch.equal(model.lm_head.weight[:50], head)
    assert torch.allclose(model.tok_emb.weight[50:], emb.mean(0).expand(4, -1))
    assert torch.allclose(model.lm_head.weight[50:], head.mean(0).expand(4, -1))
    assert (model.lm_head.weight is model.tok_emb.weight) == tied
    after = model(x)[0].detach()
    assert after.shape[-1] == 54 and torch.allclose(after[..., :50], before, atol=1e-6)
    model(torch.tensor([[53, 52, 1]]), targets=torch.tensor([[52, 1, 53]]))[1].backward()  # new rows train
    assert model.tok_emb.weight.grad[53].abs().sum() > 0
    with pytest.raises(SlmError, match="cannot shrink"):
        chat.grow_embeddings(model, 10)


# --- slm prepare and the batches ----------------------------------------------------------------


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
