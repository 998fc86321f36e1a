"""slm finetune: masked targets, packing, the step's loss normalisation, LoRA runs, exact resume,
bad input, and a tiny model learning a question -> answer table end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from slmkit.chat import render_prompt, special_ids
from slmkit.checkpoint import load_run, read_checkpoint
from slmkit.cli import main
from slmkit.data import ChatBatches, ChatSplit, open_chat_split, pack_best_fit
from slmkit.errors import SlmError
from slmkit.finetune import finetune
from slmkit.lora import LoRAConfig
from slmkit.model import GPT, ModelConfig
from slmkit.prepare_chat import prepare_chat
from slmkit.rundir import create_run
from slmkit.tokenizer import train_bpe
from slmkit.trainer import TrainConfig, Trainer, step_divisors

THINGS = ["apple", "sky", "grass", "snow", "coal", "sun", "sea", "rose", "lemon", "plum", "milk", "leaf"]
COLORS = ["red", "blue", "green", "white", "black", "yellow", "blue", "red", "yellow", "purple", "white", "green"]
TABLE = [(f"What color is the {t}?", f"The {t} is {c}.") for t, c in zip(THINGS, COLORS)]
FAST = ["train.plot=false", "train.eval_interval=50", "train.batch_size=8", "train.dtype=float32"]


@pytest.fixture(scope="module")
def qa(tmp_path_factory) -> dict[str, Path]:
    """A random tiny base run whose tokenizer knows the table's words, and the table as an SFT DATA_DIR
    (train: the table 4 times; val: the table)."""
    root = tmp_path_factory.mktemp("qa")
    tok = train_bpe([q + " " + a for q, a in TABLE] * 3, 300)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=64))
    base = create_run(root / "base", model, tok, TrainConfig())
    records = [json.dumps({"prompt": q, "completion": a}) for q, a in TABLE]
    (root / "qa.jsonl").write_text("\n".join(records * 4) + "\n", encoding="utf-8")
    (root / "val.jsonl").write_text("\n".join(records) + "\n", encoding="utf-8")
    prepare_chat([root / "qa.jsonl"], [root / "val.jsonl"], root / "sft", base)
    return {"root": root, "base": base, "sft": root / "sft"}


# --------------------------------------------------------------------------- data


def test_masked_targets_decode_to_exactly_the_responses(qa):
    from slmkit.tokenizer import load_tokenizer

    tok = load_tokenizer(qa["sft"])
    split = open_chat_split(qa["sft"], "val")
    for pack in (False, True):
        batches = ChatBatches(split, 48, 4, seed=1, pad_id=tok.eot_id, pack=pack)
        rows = batches._epoch_units(0)
        x, y, *seg = batches.next_batch()
        for r, row in enumerate(rows[:4]):
            got = tok.decode(y[r][y[r] != -1].tolist())
            # each example of the row: its answer and <|end|>, in the row's order
            want = "".join(TABLE[i][1] + "<|end|>" for i in row)
            assert got == want
        if pack:
            assert max(len(r) for r in rows) > 1  # several examples share a row


def test_best_fit_packing():
    bins = pack_best_fit(np.array([6, 5, 4, 3, 2, 9, 1]), 10)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert bins == [[0, 2], [1, 3, 4], [5, 6]]  # best fit: 4 goes with 6 (room 4), 2 with 5+3 (room 2)


# --------------------------------------------------------------------------- packing in the model


def _split(lengths: list[int], vocab: int, seed: int = 0) -> ChatSplit:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, sum(lengths)).astype(np.uint16)
    mask = (rng.random(sum(lengths)) < 0.6).astype(np.uint8)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    mask[offsets[:-1]] = 0  # an example's first token is never a target
    return ChatSplit(tokens, mask, offsets)


@pytest.mark.parametrize("variant", [
    dict(positions="learned", norm="layernorm", activation="gelu", bias=True),
    dict(positions="rope", n_kv_head=1),
])
def test_packed_batch_equals_the_examples_alone(variant):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32, **variant))
    split = _split([7, 12, 5, 9, 14, 6, 3, 11], 50)
    packed = ChatBatches(split, 32, 3, seed=0, pad_id=0, pack=True)
    x, y, seg = packed.next_batch()
    assert seg.max() >= 2  # rows of several examples
    loss = F.cross_entropy(model(x, segments=seg)[0].flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum")
    loss.backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone = 0.0
    for row in packed._epoch_units(0)[:3]:
        for i in row:
            xi, yi = ChatBatches(ChatSplit(*_one(split, i)), 32, 1, 0, 0).next_batch()
            alone = alone + F.cross_entropy(model(xi)[0][0], yi[0], ignore_index=-1, reduction="sum")
    alone.backward()
    torch.testing.assert_close(loss, alone, rtol=1e-5, atol=1e-5)
    for got, want in zip(packed_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the training path (fused loss) gives the mean over the same targets
    _, fused = model(x, y, return_logits=False, segments=seg)
    torch.testing.assert_close(fused * (y != -1).sum(), loss.detach(), rtol=1e-5, atol=1e-5)


def _one(split: ChatSplit, i: int):
    tokens, mask = split.example(i)
    return np.asarray(tokens), np.asarray(mask), np.array([0, len(tokens)], dtype=np.int64)


# --------------------------------------------------------------------------- the step's loss


def test_step_divisors_are_exactly_accum_for_equal_counts():
    assert step_divisors([512] * 8, 1, 4096) == [8.0] * 8
    assert step_divisors([100, 300], 2, 800) == [4.0, 800 / 600]
    assert step_divisors([0, 5], 1, 5) == [1.0, 1.0]


def test_batch_8_accum_1_equals_batch_1_accum_8(tmp_path):
    """Variable-length examples: one step over 8 examples at once or one at a time (8 micro-batches)
    minimises the same loss, the mean over all the step's supervised tokens."""
    split = _split([5, 17, 8, 30, 11, 6, 24, 9, 13, 7], 60, seed=3)
    results = []
    for batch, accum in ((8, 1), (1, 8)):
        torch.manual_seed(0)
        model = GPT(ModelConfig(vocab_size=60, block_size=32, n_layer=1, n_head=2, n_embd=16))
        cfg = TrainConfig(batch_size=batch, grad_accum=accum, lr=1e-2, warmup_steps=0, grad_clip=0, plot=False)
        trainer = Trainer(model, ChatBatches(split, 32, batch, seed=0, pad_id=0), lambda: {"val_loss": 0.0}, cfg,
                          tmp_path / f"{batch}x{accum}", device="cpu", dtype=torch.float32)
        grads = []  # the step's gradient, as the optimizer receives it
        trainer.optimizer.step = lambda *a, grads=grads, model=model, **k: grads.extend(
            p.grad.clone() for p in model.parameters())
        loss = trainer.train_step()
        results.append((loss, grads))
    (loss8, g8), (loss1, g1) = results
    assert loss8 == pytest.approx(loss1, rel=1e-6)
    assert len(g8) == len(g1) > 0
    for a, b in zip(g8, g1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # and it is not the mean of the per-example means (what the old loop minimised)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=60, block_size=32, n_layer=1, n_head=2, n_embd=16))
    b = ChatBatches(split, 32, 1, seed=0, pad_id=0)
    with torch.no_grad():
        means = [float(model(*b.next_batch())[1]) for _ in range(8)]
    assert abs(np.mean(means) - loss8) > 1e-3


# --------------------------------------------------------------------------- end to end


def _greedy_replies(run: Path) -> list[str]:
    from slmkit.generate import SamplingConfig, generate_tokens

    model, tok, _ = load_run(run)
    template = tok.chat_template
    end = special_ids(tok, template)[template["end"]]
    prompts = [render_prompt([("user", q)], tok, template) for q, _ in TABLE]
    out = generate_tokens(model, prompts, SamplingConfig(temperature=0.0, max_new_tokens=16), eot_id=end)
    return [tok.decode(ids) for ids in out]


def test_a_tiny_model_learns_a_question_answer_table(qa, capsys):
    run = qa["root"] / "full"
    code = main(["finetune", str(qa["base"]), "--data", str(qa["sft"]), "--out", str(run), "--quiet",
                 "train.max_steps=150", "train.lr=3e-3", *FAST])
    assert code == 0
    replies = _greedy_replies(run)
    exact = np.mean([r == a for r, (_, a) in zip(replies, TABLE)])
    assert exact > 0.9, replies
    state = json.loads((run / "best" / "state.json").read_text())
    assert state["base"]["checkpoint"] == str((qa["base"] / "best").resolve())
    assert len(state["base"]["sha256"]) == 64
    assert (run / "tokenizer" / "tokenizer_meta.json").is_file() and load_run(run)[1].chat_template
    # slm eval on the SFT set scores the responses only: every supervised val token, no more
    from slmkit.evaluate import evaluate_run

    m = evaluate_run(run, data_dir=qa["sft"])
    meta = json.loads((qa["sft"] / "meta.json").read_text())
    assert m["tokens"] == meta["val"]["supervised"] and m["accuracy"] > 0.9
    assert m["loss"] == pytest.approx(state["best_val"], rel=1e-5)  # validation is the same evaluator


def _finetune_killed_after(step: int, monkeypatch, *args, **kw) -> None:
    real = Trainer.train_step

    def step_then_die(self):
        loss = real(self)
        if self.state.step == step:
            raise KeyboardInterrupt
        return loss

    monkeypatch.setattr(Trainer, "train_step", step_then_die)
    with pytest.raises(KeyboardInterrupt):
        finetune(*args, **kw)
    monkeypatch.setattr(Trainer, "train_step", real)


@pytest.mark.parametrize("lora", [None, LoRAConfig(rank=4, alpha=8, dropout=0.1)], ids=["full", "lora"])
def test_a_killed_finetune_resumes_bit_for_bit(qa, tmp_path, monkeypatch, lora):
    over = ["train.max_steps=16", "train.checkpoint_interval=5", "train.eval_interval=8", "train.plot=false",
            "train.batch_size=4", "train.grad_accum=2"]
    finetune(qa["base"], qa["sft"], tmp_path / "whole", lora=lora, overrides=over, quiet=True)
    _finetune_killed_after(12, monkeypatch, qa["base"], qa["sft"], tmp_path / "split", lora=lora, overrides=over,
                           quiet=True)
    assert read_checkpoint(tmp_path / "split" / "last")["state"]["step"] == 10
    finetune(qa["base"], qa["sft"], tmp_path / "split", lora=lora, overrides=over, quiet=True)  # same command
    a, b = (load_file(tmp_path / r / "last" / "model.safetensors") for r in ("whole", "split"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if lora is not None:  # the checkpoint holds the adapters and the new token rows, nothing else
        assert set(a) == {k for k in a if k.endswith((".lora_A", ".lora_B"))} | {"tok_emb.new_rows"}
        assert (tmp_path / "whole" / "adapter" / "adapter.safetensors").is_file()


def test_peft_export_of_a_chat_lora_run_is_the_run(qa, tmp_path):
    """slm export LORA_RUN --format peft: PEFT's model on the exported base is the run, chat-token
    rows included (the run trains them; a base without them would score <|end|> differently)."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    run, out = tmp_path / "lora", tmp_path / "peft"
    lora = LoRAConfig(rank=4, alpha=8, targets=["qkv", "proj", "up", "down"])
    finetune(qa["base"], qa["sft"], run, lora=lora, overrides=["train.max_steps=20", "train.lr=1e-2", *FAST], quiet=True)
    assert main(["export", str(run), "--format", "peft", "--out", str(out)]) == 0
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    merged, tok, _ = load_run(run)
    ids = torch.tensor([render_prompt([("user", "What is two and two?")], tok, tok.chat_template)])
    base = transformers.AutoModelForCausalLM.from_pretrained(out / "base").eval()
    with torch.no_grad():
        ours = merged(ids)[0]
        bare = base(ids).logits
        theirs = peft.PeftModel.from_pretrained(base, out / "adapter").eval()(ids).logits
    assert (ours - bare).abs().max() > 1e-2  # the adapters matter, so the comparison below can fail
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    assert main(["export", str(qa["base"]), "--format", "peft", "--out", str(tmp_path / "no")]) == 2  # not a LoRA run


def test_lora_run_loads_merged_and_needs_its_base(qa, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(qa["base"], base)
    run = tmp_path / "lora"
    finetune(base, qa["sft"], run, lora=LoRAConfig(rank=4), overrides=["train.max_steps=6", *FAST], quiet=True)
    merged, tok, info = load_run(run)
    assert not any("lora" in n for n, _ in merged.named_parameters())  # plain linears: the fast paths apply
    assert info["lora"]["rank"] == 4
    # the same model unmerged: the live adapters give the same logits
    from slmkit.chat import grow_embeddings
    from slmkit.lora import AdapterWeights, apply_lora

    live = load_run(base)[0]
    grow_embeddings(live, tok.vocab_size)
    apply_lora(live, LoRAConfig(rank=4))
    ckpt = read_checkpoint(run / "best")
    first_new = load_run(base)[1].vocab_size
    live.load_state_dict(AdapterWeights(live, first_new=first_new).unpack(ckpt["weights"]))
    x = torch.randint(0, tok.vocab_size, (2, 20))
    torch.testing.assert_close(merged(x)[0], live.eval()(x)[0], rtol=1e-5, atol=1e-5)
    # the base changed, then gone: one clear line each, exit 2
    torch.manual_seed(1)  # a base with other weights, same shapes, in the same place
    base_model, base_tok, _ = load_run(base)
    other = create_run(tmp_path / "other", GPT(base_model.config), base_tok, TrainConfig())
    for name in ("best", "last"):
        shutil.rmtree(base / name)
        shutil.copytree(other / name, base / name)
    with pytest.raises(SlmError, match="have changed since"):
        load_run(run)
    with pytest.raises(SlmError, match="has changed since"):  # nor does the fine-tune resume on it
        finetune(base, qa["sft"], run, lora=LoRAConfig(rank=4), overrides=["train.max_steps=8", *FAST], quiet=True)
    shutil.rmtree(base)
    with pytest.raises(SlmError, match="which is gone"):
        load_run(run)
    assert main(["eval", str(run), "--data", str(qa["sft"])]) == 2


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_and_writes_nothing(qa, tmp_path, capsys, data_dir):
    out = tmp_path / "out"
    no_tok = tmp_path / "no_tok"
    shutil.copytree(qa["base"], no_tok)
    shutil.rmtree(no_tok / "tokenizer")
    cases = [
        ([str(no_tok), "--data", str(qa["sft"])], "has no tokenizer"),
        ([str(qa["base"]), "--data", str(data_dir)], "was not prepared with the tokenizer of"),
        ([str(qa["base"]), "--data", str(qa["sft"]), "model.n_layer=3"], "cannot be set by slm finetune"),
        ([str(qa["base"]), "--data", str(qa["sft"]), "--lora-rank", "4"], "--lora-rank needs --lora"),
        ([str(qa["base"]), "--data", str(qa["sft"]), "--lora", "train.weight_decay=0.1"], "weight_decay must be 0"),
    ]
    for argv, message in cases:
        assert main(["finetune", *argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not out.exists()


def test_continued_pretraining_on_text(run_dir, data_dir, tmp_path):
    """Plain text prepared with the base's tokenizer: the pretraining batches and evaluator."""
    out = tmp_path / "cont"
    summary = finetune(run_dir, data_dir, out, overrides=["train.max_steps=4", "train.batch_size=4", "train.plot=false"],
                       quiet=True)
    assert summary["steps"] == 4 and "val_bpb" in summary
    assert read_checkpoint(out / "last")["state"]["base"]["vocab_size"] == load_run(run_dir)[1].vocab_size


@pytest.mark.slow
def test_two_processes_follow_the_single_process_curve(qa, tmp_path):
    """DDP through ``slm finetune --nproc 2`` (torchrun, gloo): the same global batch gives the same
    losses as one process, since the step's loss is normalised over the targets of every rank."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    over = ["train.max_steps=6", "train.batch_size=4", "train.grad_accum=2", "train.log_interval=1",
            "train.eval_interval=3", "train.plot=false", "finetune.pack=false"]
    finetune(qa["base"], qa["sft"], tmp_path / "one", lora=LoRAConfig(rank=4), overrides=over, quiet=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "slmkit.finetune", str(qa["base"]), "--data", str(qa["sft"]), "--out",
           str(tmp_path / "two"), "--nproc", "2", "--lora", "--lora-rank", "4", "--quiet", *over]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    def curve(run: Path, key: str) -> list[float]:
        return [r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]

    assert len(curve(tmp_path / "two", "loss")) == 6
    assert curve(tmp_path / "two", "loss") == pytest.approx(curve(tmp_path / "one", "loss"), rel=1e-4)
    assert curve(tmp_path / "two", "val_loss") == pytest.approx(curve(tmp_path / "one", "val_loss"), rel=1e-4)
    assert (tmp_path / "two" / "adapter" / "adapter.safetensors").is_file()
