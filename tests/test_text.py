"""Text: stop strings, streaming, UTF-8, the text API.
"""

from __future__ import annotations

from slmkit.generate import SamplingConfig, TextStream, generate, stream

from generation_models import TOK, one_thread, random_model, script_model  # noqa: F401 (one_thread: a fixture)


# --- text: stop strings, streaming, UTF-8 ---------------------------------------------------------


def test_stop_strings_cut_exactly():
    model = script_model("Ha!ZQ_STOP.wxyz")
    cfg = SamplingConfig(max_new_tokens=40, temperature=0.7, stop=["STOP"])
    assert generate(model, TOK, ["H"], cfg) == ["a!ZQ_"]
    assert generate(model, TOK, ["Z"], SamplingConfig(max_new_tokens=40, stop=["xyz", "Q_S"])) == [""]
    pieces = list(stream(model, TOK, "Ha", SamplingConfig(max_new_tokens=40, stop=["_STOP", "!Z"])))
    assert "".join(pieces) == ""
    pieces = list(stream(model, TOK, "H", SamplingConfig(max_new_tokens=40, stop=["OP.w"])))
    assert "".join(pieces) == "a!ZQ_ST"
    # No stop: the text runs on to max_new_tokens.
    assert generate(model, TOK, ["H"], SamplingConfig(max_new_tokens=18)) == ["a!ZQ_STOP.wxyzHa!Z"]


def test_text_stream_holds_back_possible_stop_starts():
    s = TextStream(TOK, stop=["The end"])
    out = [s.push(t) for t in TOK.encode("Go. The eagle. The en")]
    assert "".join(out) == "Go. The eagle. "  # "The en" could still become "The end"
    assert s.push(ord("d")) == "" and s.stopped
    s = TextStream(TOK, stop=["The end"])
    assert "".join(s.push(t) for t in TOK.encode("The en")) == "" and s.finish() == "The en"


def test_eot_stops_by_default_and_no_stop_runs_on():
    model = script_model("Hi.", then_eot=True)
    assert generate(model, TOK, ["H"], SamplingConfig(max_new_tokens=20)) == ["i."]
    text = generate(model, TOK, ["H"], SamplingConfig(max_new_tokens=7, stop_at_eot=False))[0]
    assert text == "i.<|endoftext|>Hi.<|endoftext|>"


def test_streaming_multibyte_characters():
    text = "é€😀ß"
    s = TextStream(TOK)
    pieces = [s.push(t) for t in TOK.encode(text)]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert pieces[0] == "" and pieces[1] == "é"  # the first byte of é waits for the second
    s = TextStream(TOK)
    assert s.push(0xE2) == "" and s.push(0x82) == "" and s.finish() == "\ufffd"  # cut off: replaced
    # Through the model: each piece is whole characters, in order.
    model = script_model("xé€😀")
    pieces = list(stream(model, TOK, "x", SamplingConfig(max_new_tokens=12)))
    assert "".join(pieces) == "é€😀xé" and all("\ufffd" not in p for p in pieces)
    assert len(pieces) == 5


def test_generate_returns_completions_only_and_batches():
    model = script_model("Helo wrd!")
    prompts = ["H", "w", "!"]
    cfg = SamplingConfig(max_new_tokens=4, seed=0)
    out = generate(model, TOK, prompts, cfg)
    assert out == [generate(model, TOK, [p], cfg)[0] for p in prompts]


def test_seeded_text_is_reproducible():
    model = random_model(11, vocab_size=257, n_embd=32)
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.2, seed=5, stop_at_eot=False)
    first = "".join(stream(model, TOK, "ab", cfg))
    assert "".join(stream(model, TOK, "ab", cfg)) == first == generate(model, TOK, ["ab"], cfg)[0]


def test_empty_prompt_starts_a_new_document():
    model = script_model("Hi.", then_eot=True)
    assert generate(model, TOK, [""], SamplingConfig(max_new_tokens=10)) == ["Hi."]
