"""Chat / instruction data: record forms, the template, the loss mask, added tokens, growing the
embeddings (the SFT DATA_DIR that ``slm prepare`` writes: tests/test_prepare_chat.py)."""

from __future__ import annotations

import json
from pathlib import Path

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
