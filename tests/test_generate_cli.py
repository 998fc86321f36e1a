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


# --- chat with a template ---------------------------------------------------------------------------

REPLY = "Tom had a cake."


@pytest.fixture(scope="module")
def chat_tok():
    from slmkit import chat
    from slmkit.tokenizer import train_bpe

    from conftest import make_corpus

    return chat.add_chat_tokens(train_bpe(make_corpus(), 300))


def chat_model(tok, **kw):
    """A bigram GPT that answers any prompt ending in <|assistant|> with REPLY (a <|system|> token
    in its middle, which must not be shown), then <|end|>, and after <|end|> would say REPLY again:
    the reply shows that generation ends at the end token and hides special tokens."""
    from slmkit.chat import special_ids

    from generation_models import bigram_model

    sid = special_ids(tok, tok.chat_template)
    body = tok.encode(REPLY)
    script = [sid["<|assistant|>"], *body[:3], sid["<|system|>"], *body[3:], sid["<|end|>"], body[0]]
    assert len(set(script)) == len(script) - 1  # a bigram table: each token (but the last) once
    follow = {a: {b: 0.0} for a, b in zip(script, script[1:])}
    return bigram_model(follow, vocab_size=tok.vocab_size, **kw)


@pytest.fixture
def chat_run(chat_tok, monkeypatch):
    model = chat_model(chat_tok, block_size=64)
    monkeypatch.setattr(G, "_load", lambda args: (model, chat_tok))
    seen: list[list[int]] = []  # the prompt ids of each reply streamed (chat and generate --chat)

    def spy(real):
        def recording(model, where, ids, cfg, **kw):
            seen.append(ids)
            return real(model, where, ids, cfg, **kw)
        return recording

    monkeypatch.setattr(G, "stream_reply", spy(G.stream_reply))
    monkeypatch.setattr(G, "stream_ids", spy(G.stream_ids))
    return seen


def test_generate_chat_prints_only_the_reply(chat_run, chat_tok, capsys):
    from slmkit.chat import render_prompt

    assert G.run_generate(cli_args("generate", "--chat", "--prompt", "Who had a cake?", "--system", "Be brief.",
                                   "--temperature", "0")) == 0
    assert capsys.readouterr().out == REPLY + "\n"
    turns = [("system", "Be brief."), ("user", "Who had a cake?")]
    assert G.run_generate(cli_args("generate", "--chat", "--prompt", "Who had a cake?", "--system", "Be brief.",
                                   "--num-samples", "2", "--max-new-tokens", "30")) == 0
    assert capsys.readouterr().out == f"{REPLY}\n---\n{REPLY}\n"  # the batch path stops and hides the same
    assert chat_run == [render_prompt(turns, chat_tok, chat_tok.chat_template)]
    assert G.run_generate(cli_args("generate", "--chat", "--prompt", "Hi", "--beams", "2")) == 0
    assert capsys.readouterr().out == REPLY + "\n"
    assert G.run_generate(cli_args("generate", "--prompt", "Hi", "--max-new-tokens", "3")) == 0
    assert capsys.readouterr().out.startswith("Hi")  # without --chat: raw continuation, prompt echoed
    with pytest.raises(SlmError, match="--system is a chat option: add --chat"):
        G.run_generate(cli_args("generate", "--prompt", "Hi", "--system", "x"))


def test_chat_flags_on_a_run_without_a_template_name_the_fix(scripted_run):
    with pytest.raises(SlmError, match=r"run RUN has no chat template .*slm prepare .*slm finetune"):
        G.run_generate(cli_args("generate", "--chat", "--prompt", "Hi"))
    with pytest.raises(SlmError, match=r"--system: run RUN has no chat template .*slm finetune"):
        G.run_chat(cli_args("chat", "--system", "Be kind."))


def test_chat_loop_with_a_template_keeps_and_trims_history(chat_run, chat_tok, monkeypatch, capsys):
    from slmkit.chat import render_prompt

    lines = ["Hi", "", "Who?", "/reset", "Hi", "more", "again", "/quit", "never read"]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    assert G.run_chat(cli_args("chat", "--system", "Be kind.", "--temperature", "0", "--max-new-tokens", "16")) == 0
    out, err = capsys.readouterr()
    assert out == (REPLY + "\n") * 5  # one reply per message; the empty line and the commands get none
    system, answer = [("system", "Be kind.")], ("assistant", REPLY)
    expected = [
        system + [("user", "Hi")],
        system + [("user", "Hi"), answer, ("user", "Who?")],
        system + [("user", "Hi")],  # after /reset
        system + [("user", "Hi"), answer, ("user", "more")],
        system + [("user", "more"), answer, ("user", "again")],  # the oldest exchange went
    ]
    assert chat_run == [render_prompt(t, chat_tok, chat_tok.chat_template) for t in expected]
    budget = 64 - 16  # the context less room for the reply
    assert all(len(ids) <= budget for ids in chat_run)
    untrimmed = system + [("user", "Hi"), answer, ("user", "more"), answer, ("user", "again")]
    assert len(render_prompt(untrimmed, chat_tok, chat_tok.chat_template)) > budget
    assert err.count("history trimmed") == 1 and "the 2 oldest turn(s)" in err and "context of 64 tokens" in err


def test_chat_refuses_a_message_longer_than_the_context_and_goes_on(chat_run, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("word " * 80 + "\nHi\n"))
    assert G.run_chat(cli_args("chat", "--temperature", "0")) == 0
    out, err = capsys.readouterr()
    assert out == REPLY + "\n" and len(chat_run) == 1
    assert err.startswith("error: the message takes ") and "context holds 64: shorten it" in err


def test_slm_chat_and_generate_chat_on_a_saved_run(chat_tok, tmp_path, monkeypatch, capsys):
    """End to end through ``slm``: the template comes back from the run's tokenizer files."""
    from slmkit.rundir import create_run
    from slmkit.trainer import TrainConfig

    from export_models import slm

    run = create_run(tmp_path / "chat", chat_model(chat_tok), chat_tok, TrainConfig())
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nAnd then?\n"))
    assert slm("chat", run, "--temperature", "0") == 0
    assert capsys.readouterr().out == (REPLY + "\n") * 2
    assert slm("generate", run, "--chat", "--prompt", "Hello", "--seed", "3") == 0
    assert capsys.readouterr().out == REPLY + "\n"
