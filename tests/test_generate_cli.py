"""The CLI: slm generate and slm chat, on a scripted model.
"""

from __future__ import annotations

import io

import pytest

import slmkit.generate.cli as G
from slmkit.errors import SlmError

from generation_models import TOK, one_thread, script_model  # noqa: F401 (one_thread: a fixture)


# --- CLI ------------------------------------------------------------------------------------------


def cli_args(command: str, *argv: str):
    import argparse

    parser = argparse.ArgumentParser()
    (G.add_generate_arguments if command == "generate" else G.add_chat_arguments)(parser)
    return parser.parse_args(["RUN", *argv])


@pytest.fixture
def scripted_run(monkeypatch):
    model = script_model("Hi, Bob.", then_eot=True)
    monkeypatch.setattr(G, "_load", lambda args: (model, TOK))
    return model


def test_cli_generate_streams_prompt_and_continuation(scripted_run, capsys):
    assert G.run_generate(cli_args("generate", "--prompt", "Hi", "--seed", "1")) == 0
    assert capsys.readouterr().out == "Hi, Bob.\n"
    assert G.run_generate(cli_args("generate", "--prompt", "Hi", "--num-samples", "3", "--stop", "B")) == 0
    assert capsys.readouterr().out == "Hi, \n---\nHi, \n---\nHi, \n"
    assert G.run_generate(cli_args("generate", "--prompt", "B", "--no-stop", "--max-new-tokens", "9", "--stop", "\\n")) == 0
    assert capsys.readouterr().out == "Bob.<|endoftext|>Hi, B\n"
    with pytest.raises(SlmError, match="top_p"):
        G.run_generate(cli_args("generate", "--top-p", "2"))


def test_cli_chat_loop(scripted_run, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n/reset\nB\n"))
    assert G.run_chat(cli_args("chat")) == 0
    assert capsys.readouterr().out == ", Bob.\nob.\n"


def test_cli_chat_ctrl_c_stops_the_reply_only(scripted_run, monkeypatch, capsys):
    def interrupted(*args):
        yield "partial"
        raise KeyboardInterrupt

    replies = iter([interrupted, lambda *a: iter(["fine"])])
    monkeypatch.setattr(G, "stream", lambda *a: next(replies)(*a))
    monkeypatch.setattr("sys.stdin", io.StringIO("one\ntwo\n"))
    assert G.run_chat(cli_args("chat")) == 0
    assert capsys.readouterr().out == "partial [stopped]\nfine\n"


def test_cli_reads_the_sample_section_of_a_config_file_and_flags_win(scripted_run, tmp_path, monkeypatch, capsys):
    config = tmp_path / "run.toml"  # a run's file may hold every stage's sections: [model] is not an error here
    config.write_text('[model]\nn_layer = 2\n\n[sample]\nmax_new_tokens = 5\nstop = ["o"]\n')
    assert G.run_generate(cli_args("generate", "--prompt", "Hi", "--config", str(config))) == 0
    assert capsys.readouterr().out == "Hi, B\n"  # ", Bob" cut at "o"
    assert G.run_generate(cli_args("generate", "--prompt", "Hi", "--config", str(config), "--max-new-tokens", "2")) == 0
    assert capsys.readouterr().out == "Hi, \n"
    assert G.run_generate(cli_args("generate", "--prompt", "Hi", "--config", str(config), "--stop", "b")) == 0
    assert capsys.readouterr().out == "Hi, Bo\n"  # the command line's stop list replaces the file's
    config.write_text("[sample]\nmax_new_tokens = 9\nstop_at_eot = false\n")
    assert G.run_generate(cli_args("generate", "--prompt", "B", "--config", str(config))) == 0
    assert capsys.readouterr().out == "Bob.<|endoftext|>Hi, B\n"
    config.write_text("[sample]\nmax_new_tokens = 2\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    assert G.run_chat(cli_args("chat", "--config", str(config))) == 0
    assert capsys.readouterr().out == ", \n"


@pytest.mark.parametrize("text, message", [
    ("[sample]\ntemprature = 0.5\n", r"unknown config key sample.temprature \(did you mean sample.temperature\?\)"),
    ("[sampel]\nseed = 1\n", r"unknown config section \[sampel\] in .*run.toml: did you mean \[sample\]\?"),
    ("[sample]\nseed = 1.5\n", r"sample.seed = 1.5 has the wrong type: expected int"),
    ("[sample]\ntop_p = 0\n", r"top_p must be in \(0, 1\]"),
    ("[sample\n", r"run.toml is not valid TOML"),
])
def test_cli_config_file_errors(scripted_run, tmp_path, text, message):
    config = tmp_path / "run.toml"
    config.write_text(text)
    with pytest.raises(SlmError, match=message):
        G.run_generate(cli_args("generate", "--config", str(config)))
