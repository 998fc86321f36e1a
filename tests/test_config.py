import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from slmkit.config import (
    add_section_arguments, check_sections, from_dict, load_preset, parse_duration, parse_overrides, preset_names,
    section_from_args,
)
from slmkit.errors import SlmError
from slmkit.generate import SamplingConfig
from slmkit.model import ModelConfig
from slmkit.train import TrainConfig


def test_presets_ship_and_load():
    names = preset_names()
    for required in ["tiny", "quickstart", "stories260k", "stories15m", "stories42m", "stories110m"]:
        assert required in names
    for name in names:
        sections = load_preset(name)
        from_dict(ModelConfig, sections["model"], "model")
        from_dict(TrainConfig, sections["train"], "train")


def test_llama2c_shapes():
    m = load_preset("stories260k")["model"]
    assert (m["n_embd"], m["n_layer"], m["n_head"], m["n_kv_head"], m["block_size"]) == (64, 5, 8, 4, 512)
    m = load_preset("stories15m")["model"]
    assert (m["n_embd"], m["n_layer"], m["n_head"], m["block_size"]) == (288, 6, 6, 256)


@pytest.mark.parametrize("preset,hidden,params", [
    # llama2.c's checkpoints at its vocab (512 for stories260K, 32000 for the others), tied head:
    # embedding + per layer (wq, wk, wv, wo, w1, w2, w3, two norms) + final norm.
    ("stories260k", 172, 512 * 64 + 5 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 172 + 2 * 64) + 64),  # 260,032
    ("stories15m", 768, 32000 * 288 + 6 * (4 * 288 * 288 + 3 * 288 * 768 + 2 * 288) + 288),
    ("stories42m", 1376, 32000 * 512 + 8 * (4 * 512 * 512 + 3 * 512 * 1376 + 2 * 512) + 512),
])
def test_presets_have_llama2c_parameter_counts(preset, hidden, params):
    from slmkit.model import GPT

    vocab = 512 if preset == "stories260k" else 32000
    model = GPT(from_dict(ModelConfig, {**load_preset(preset)["model"], "vocab_size": vocab}, "model"))
    assert model.config.hidden_dim == hidden
    assert model.num_params(non_embedding=False) == params


def test_unknown_preset_suggests_closest():
    with pytest.raises(SlmError, match="did you mean 'stories15m'"):
        load_preset("stories15")


def test_overrides_parse_types():
    o = parse_overrides(["model.n_layer=4", "train.lr=1e-3", "model.bias=true", "model.norm=layernorm",
                         'train.max_time="5m"'])
    assert o == {"model": {"n_layer": 4, "bias": True, "norm": "layernorm"}, "train": {"lr": 1e-3, "max_time": "5m"}}


@pytest.mark.parametrize("items, msg", [
    (["n_layer=4"], "section.key=value"),
    (["model.n_layer"], "section.key=value"),
    (["a.b.c=1"], "section.key=value"),
])
def test_bad_override_syntax(items, msg):
    with pytest.raises(SlmError, match=msg):
        parse_overrides(items)


@pytest.mark.parametrize("data, msg", [
    ({"n_layers": 4}, r"unknown config key model.n_layers \(did you mean model.n_layer\?\)"),
    ({"n_layer": "four"}, "wrong type: expected int"),
    ({"n_layer": 2.5}, "wrong type"),
    ({"bias": 1}, "wrong type: expected bool"),
    ({"norm": "batchnorm"}, "choose one of 'layernorm' | 'rmsnorm'"),
    ({"n_embd": 100, "n_head": 3}, "does not divide"),
])
def test_model_validation_errors(data, msg):
    with pytest.raises(SlmError, match=msg):
        from_dict(ModelConfig, data, "model")


def test_int_promotes_to_float_and_optional():
    cfg = from_dict(TrainConfig, {"lr": 1, "max_time": None}, "train")
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert from_dict(ModelConfig, {"n_kv_head": None}, "model").n_kv_head is None


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("15m", 900), ("1h30m", 5400), ("2.5m", 150), ("45", 45)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-5m", "0", "5x"])
def test_bad_durations(text):
    with pytest.raises(SlmError, match="duration"):
        parse_duration(text)


# --- flags from fields ----------------------------------------------------------------------------


@dataclass
class Knobs:
    """One field of each kind a flag can be made from, and one that is no flag (no help)."""

    steps: int = field(default=3, metadata={"help": "steps (default %(default)s), 100%% of them"})
    rate: float = field(default=0.5, metadata={"help": "rate"})
    limit: int | None = field(default=None, metadata={"help": "limit", "flag": "--cap", "metavar": "N"})
    words: list[str] = field(default_factory=list, metadata={"help": "words", "parse": str.upper})
    loud: bool = field(default=False, metadata={"help": "be loud"})
    keep: bool = field(default=True, metadata={"help": "drop it"})
    mode: Literal["a", "b"] = field(default="a", metadata={"help": "mode"})
    internal: int = 7

    def validate(self) -> None:
        if self.steps < 1:
            raise SlmError(f"steps must be at least 1, got {self.steps}")


def knob_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knobs")
    add_section_arguments(parser, Knobs)
    return parser


def test_flags_are_made_from_the_fields():
    parser = knob_parser()
    flags = {s for a in parser._actions for s in a.option_strings} - {"-h", "--help"}
    assert flags == {"--steps", "--rate", "--cap", "--words", "--loud", "--no-keep", "--mode"}  # no --internal
    assert vars(parser.parse_args([])) == {}  # flags not given leave nothing: the defaults come from the dataclass
    args = parser.parse_args(["--steps", "5", "--rate", "2", "--cap", "9", "--words", "a", "b", "--words", "c",
                              "--loud", "--no-keep", "--mode", "b"])
    assert vars(args) == dict(steps=5, rate=2.0, limit=9, words=["A", "B", "C"], loud=True, keep=False, mode="b")
    assert isinstance(args.rate, float)
    text = parser.format_help()
    assert "steps (default 3), 100% of them" in text and "--cap N" in text
    for bad in (["--steps", "many"], ["--mode", "c"], ["--rate"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_section_from_args_coerces_and_validates_like_a_config_file():
    parser = knob_parser()
    assert section_from_args(Knobs, parser.parse_args([]), "knobs") == Knobs()
    assert section_from_args(Knobs, parser.parse_args(["--no-keep"]), "knobs") == Knobs(keep=False)
    with pytest.raises(SlmError, match=r"^knobs.steps = 'many' has the wrong type: expected int$"):
        section_from_args(Knobs, parser.parse_args([]), "knobs", {"steps": "many"})
    with pytest.raises(SlmError, match=r"^knobs.rate = nan must be a finite number$"):
        section_from_args(Knobs, parser.parse_args(["--rate", "nan"]), "knobs")
    with pytest.raises(SlmError, match="steps must be at least 1, got 0"):  # the dataclass's validate()
        section_from_args(Knobs, parser.parse_args(["--steps", "0"]), "knobs")
    # A field without a flag is still a key of the section, and is what a typo is matched against.
    with pytest.raises(SlmError, match=r"^unknown config key knobs.internals \(did you mean knobs.internal\?\)$"):
        section_from_args(Knobs, parser.parse_args([]), "knobs", {"internals": 1})


def test_command_line_beats_the_toml_table():
    parser = knob_parser()
    table = {"steps": 8, "rate": 1, "words": ["x"], "keep": False, "internal": 1}
    cfg = section_from_args(Knobs, parser.parse_args(["--rate", "0.25", "--words", "y"]), "knobs", table)
    assert cfg == Knobs(steps=8, rate=0.25, words=["Y"], keep=False, internal=1)  # a list flag replaces the list


def test_bad_sample_key_suggests_the_field():
    parser = argparse.ArgumentParser()
    add_section_arguments(parser, SamplingConfig)
    with pytest.raises(SlmError, match=r"^unknown config key sample.temprature \(did you mean sample.temperature\?\)$"):
        section_from_args(SamplingConfig, parser.parse_args([]), "sample", {"temprature": 0.5})
    with pytest.raises(SlmError, match="top_p must be in"):
        section_from_args(SamplingConfig, parser.parse_args([]), "sample", {"top_p": 2})


def test_unknown_section_is_named_with_its_file():
    check_sections({"model": {}, "sample": {"seed": 1}}, ["model", "train", "sample"], "run.toml")
    with pytest.raises(SlmError, match=r"unknown config section \[sampel\] in run.toml: did you mean \[sample\]\?"):
        check_sections({"sampel": {}}, ["model", "train", "sample"], "run.toml")
    with pytest.raises(SlmError, match=r"\[sample\] in run.toml must be a table"):
        check_sections({"sample": 3}, ["sample"], "run.toml")


def test_a_typo_in_flag_metadata_is_a_program_error():
    @dataclass
    class Bad:
        x: int = field(default=1, metadata={"help": "x", "metvar": "N"})

    with pytest.raises(TypeError, match="metvar"):
        add_section_arguments(argparse.ArgumentParser(), Bad)
