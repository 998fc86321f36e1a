"""``slm quickstart``, shortened: offline on the built-in corpus, it prepares data, trains, writes
its run and prints samples from it."""

from __future__ import annotations

import json

import pytest

from slmkit import prepare
from slmkit.checkpoint import load_run, read_checkpoint
from slmkit.cli import main
from slmkit.errors import SlmError
from slmkit.generate import SamplingConfig, generate
from slmkit.quickstart import PROMPTS, SAMPLING, _corpus


@pytest.mark.slow
def test_quickstart_trains_writes_its_run_and_prints_samples(tmp_path, capsys):
    out = tmp_path / "qs"
    code = main(["quickstart", "--source", "builtin", "--out", str(out), "--max-steps", "20"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "[1/3] corpus: built-in Python documentation text (offline)" in stderr
    assert "[2/3] training the 'quickstart' preset for 5m or 20 steps" in stderr
    assert f"Try: slm generate {out / 'run'}" in stderr

    meta = json.loads((out / "data" / "meta.json").read_text())
    assert meta["vocab_size"] == 2048 and meta["train"]["tokens"] > 100_000
    for name in ("config.toml", "metrics.jsonl", "loss.png", "tokenizer/tokenizer.json", "last/model.safetensors",
                 "best/model.safetensors"):
        assert (out / "run" / name).exists(), name
    assert read_checkpoint(out / "run" / "last")["state"]["step"] == 20
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert [r["step"] for r in records if "loss" in r] == [1, 10, 20]
    assert losses[-1] < losses[0] - 0.5  # ln(2048) = 7.6 at the start; ~6.7 after 20 steps
    assert [r["step"] for r in records if "val_loss" in r] == [20]

    # One sample per prompt on stdout, "--- PROMPT" and what the model wrote: the samples of the
    # run it wrote, as slm generate would give them with the same settings.
    model, tokenizer, _ = load_run(out / "run")
    assert model.config.n_layer == 4 and tokenizer.vocab_size == 2048  # the quickstart preset, on its data
    prompts = PROMPTS["builtin"]
    samples = generate(model, tokenizer, prompts, SamplingConfig(**SAMPLING))
    assert stdout == "".join(f"--- {p}{s}\n" for p, s in zip(prompts, samples))
    assert all(samples) and sum(len(tokenizer.encode(s)) for s in samples) >= 30  # 80 tokens each, or up to an <|endoftext|>


def test_quickstart_falls_back_to_the_builtin_corpus_offline(tmp_path, monkeypatch, capsys):
    def offline(spec: str):
        raise SlmError(f"cannot download hf:{spec} (offline and not in the Hugging Face cache): pass a local file")

    monkeypatch.setattr(prepare, "_hf_files", offline)
    name, inputs = _corpus("auto", tmp_path)
    assert name == "builtin" and inputs == [str(tmp_path / "builtin_corpus.txt")]
    assert "<|endoftext|>" in (tmp_path / "builtin_corpus.txt").read_text(encoding="utf-8")
    assert "TinyStories not reachable (cannot download hf:roneneldan/TinyStories" in capsys.readouterr().err
    with pytest.raises(SlmError, match="cannot download"):  # asked for by name: no silent fallback
        _corpus("tinystories", tmp_path)


def test_quickstart_max_steps_must_be_positive(tmp_path, capsys):
    assert main(["quickstart", "--source", "builtin", "--out", str(tmp_path / "qs"), "--max-steps", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --max-steps must be positive, got 0"
    assert not (tmp_path / "qs").exists()
