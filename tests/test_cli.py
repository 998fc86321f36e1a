"""The CLI end to end on a tiny corpus, and the one-line errors (exit code 2) for bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

from slmkit.cli import main

from conftest import TINY


def slm(*args: str) -> int:
    return main([str(a) for a in args])


def test_end_to_end(tmp_path, corpus_file, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    assert slm("prepare", "--input", corpus_file, "--out", data, "--vocab-size", 300) == 0
    meta = json.loads((data / "meta.json").read_text())
    assert meta["vocab_size"] == 300 and meta["train"]["tokens"] > 0
    assert slm("train", "--data", data, "--out", run, "--quiet", *TINY, "train.max_steps=40",
               "train.eval_interval=20") == 0
    capsys.readouterr()
    assert slm("generate", run, "--prompt", "Once upon a time", "--max-new-tokens", 20, "--seed", 1) == 0
    out = capsys.readouterr().out
    assert out.startswith("Once upon a time") and len(out) > len("Once upon a time")
    assert slm("eval", run, "--data", data, "--json") == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) >= {"loss", "perplexity", "bpb", "accuracy"}
    assert slm("info", run) == 0
    info = capsys.readouterr().out
    assert "parameters" in info and "40 steps" in info
    # Resume: a second call continues from last/ to the new max_steps.
    assert slm("train", "--data", data, "--out", run, "--quiet", *TINY, "train.max_steps=50",
               "train.eval_interval=20") == 0
    assert slm("info", run, "--json") == 0
    assert json.loads(capsys.readouterr().out)["step"] == 50


def one_error_line(capsys, code: int, pattern: str) -> str:
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and pattern in err, err
    return err


def test_missing_input_file(tmp_path, capsys):
    one_error_line(capsys, slm("prepare", "--input", tmp_path / "nope.txt", "--out", tmp_path / "d"), "nope.txt")


def test_empty_corpus(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n<|endoftext|>\n\n")
    one_error_line(capsys, slm("prepare", "--input", tmp_path / "empty.txt", "--out", tmp_path / "d"), "empty.txt")
    assert not (tmp_path / "d").exists()


def test_non_utf8_input(tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 20)
    one_error_line(capsys, slm("prepare", "--input", tmp_path / "latin1.txt", "--out", tmp_path / "d"), "UTF-8")


def test_bad_override_and_unknown_preset(data_dir, tmp_path, capsys):
    one_error_line(capsys, slm("train", "--data", data_dir, "--out", tmp_path / "r", "model.n_layers=2"),
                   "unknown config key model.n_layers")
    one_error_line(capsys, slm("train", "--data", data_dir, "--out", tmp_path / "r", "--preset", "stories16m"),
                   "did you mean 'stories15m'")
    one_error_line(capsys, slm("train", "--data", data_dir, "--out", tmp_path / "r", "model.n_head=5"),
                   "does not divide")
    assert not (tmp_path / "r").exists()  # validated before any work


def test_missing_data_dir(tmp_path, capsys):
    one_error_line(capsys, slm("train", "--data", tmp_path / "nodata", "--out", tmp_path / "r"), "slm prepare")


def test_incompatible_run_dir_keeps_checkpoint(data_dir, run_dir, capsys):
    before = (run_dir / "last" / "manifest.json").read_text()
    one_error_line(capsys, slm("train", "--data", data_dir, "--out", run_dir, *TINY, "model.n_embd=64"),
                   "different model config")
    assert (run_dir / "last" / "manifest.json").read_text() == before


def test_generate_without_checkpoint(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    one_error_line(capsys, slm("generate", tmp_path / "r", "--prompt", "hi"), "no checkpoint")


def test_console_entry_point_prints_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-m", "slmkit.cli", "eval", str(tmp_path / "missing"), "--data", "x"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
