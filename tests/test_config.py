import pytest

from slmkit.config import from_dict, load_preset, parse_duration, parse_overrides, preset_names
from slmkit.errors import SlmError
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
