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


def test_generate_config_file_with_a_misspelt_sample_key(tmp_path, capsys):
    """Checked before the checkpoint is read: the one line names the key and suggests the right one."""
    (tmp_path / "r").mkdir()
    (tmp_path / "run.toml").write_text("[sample]\ntop_kk = 5\n")
    one_error_line(capsys, slm("chat", tmp_path / "r", "--config", tmp_path / "run.toml"),
                   "unknown config key sample.top_kk (did you mean sample.top_k?)")


def test_console_entry_point_prints_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-m", "slmkit.cli", "eval", str(tmp_path / "missing"), "--data", "x"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def _train_output(data_dir: Path, run: Path, stderr_to_terminal: bool) -> str:
    """What `slm train` writes to stderr when it goes to a pipe, or to a terminal (a pty)."""
    import pty

    cmd = [sys.executable, "-m", "slmkit.cli", "train", "--data", str(data_dir), "--out", str(run), *TINY,
           "train.max_steps=40", "train.log_interval=10", "train.eval_interval=20"]
    env = {**os.environ, "SLMKIT_CPU_KERNELS": "0", "COLUMNS": "100"}
    if not stderr_to_terminal:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=300) == 0
    return b"".join(chunks).decode("utf-8", "replace")


def test_progress_is_plain_lines_in_a_log_and_a_bar_on_a_terminal(data_dir, tmp_path):
    logged = _train_output(data_dir, tmp_path / "piped", stderr_to_terminal=False)
    assert "\r" not in logged
    steps = [line for line in logged.splitlines() if line.startswith("step ") and "tok/s" in line]
    # One line per log_interval (and step 1), with the loss, the lr and the speed.
    assert [line.split()[1] for line in steps] == ["1", "10", "20", "30", "40"], logged
    assert "(40/40): loss " in steps[-1] and ", lr " in steps[-1]
    evals = [line for line in logged.splitlines() if line.startswith("step ") and "val bpb" in line]
    assert [line.split()[1] for line in evals] == ["20:", "40:"], logged
    assert len(logged) < 3000
    on_terminal = _train_output(data_dir, tmp_path / "tty", stderr_to_terminal=True)
    assert "\r" in on_terminal and "step" in on_terminal  # tqdm redraws its bar in place
    assert not any(line.startswith("step 10 (") for line in on_terminal.splitlines())
