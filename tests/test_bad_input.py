"""Bad and hostile input: each either works or ends with one clear line (exit code 2), never a
traceback; a failed ``slm prepare`` leaves no half-made DATA_DIR; checkpoints never run code.

Property-based (hypothesis) where the input space is large: the tokenizer, the config parser, the
data reader. See docs/reliability.md for the list.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import slmkit.export  # noqa: F401 - imported plainly (no importorskip): a module that does not import fails here
import slmkit.generate  # noqa: F401
from slmkit.checkpoint import load_run, read_checkpoint
from slmkit.cli import main
from slmkit.config import from_dict, load_preset, parse_duration, parse_overrides, preset_names
from slmkit.data import load_meta, open_split
from slmkit.errors import SlmError
from slmkit.model import ModelConfig
from slmkit.prepare import prepare
from slmkit.tokenizer import load_tokenizer
from slmkit.train import TrainConfig, resolve_config

from conftest import REPO, TINY, make_corpus

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run_cli(*args) -> tuple[int, str]:
    """``slm ARGS`` in-process with stdout/stderr captured (hypothesis can't use capsys)."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main([str(a) for a in args])
    return code, err.getvalue()


def assert_one_error_line(code: int, err: str) -> str:
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok(data_dir):
    return load_tokenizer(data_dir)  # the BPE as slm prepare saved it


@SETTINGS
@given(st.lists(st.one_of(st.text(), st.sampled_from(["<|endoftext|>", "\x00", "\r\n", "\ufeff", "\u202e", "🦙"])),
                max_size=8).map("".join))
def test_tokenizer_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids) and tok.eot_id not in ids  # text never makes the separator
    assert tok.decode(ids) == text
    assert b"".join(tok.decode_bytes([i]) for i in ids) == text.encode("utf-8")  # streaming, token by token


# --------------------------------------------------------------------------- config parser

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=5), SCALARS, max_size=2))


def keys_of(cls) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(list(cls.__dataclass_fields__)), st.text(max_size=12))


@pytest.mark.parametrize("bad", ["", "soon", "-5m", "0s"])
def test_bad_max_time_names_the_field(bad):
    """Found by the property test below: a bad duration said what was wrong but not where."""
    with pytest.raises(SlmError, match=r"^train\.max_time: duration"):
        from_dict(TrainConfig, {"max_time": bad}, "train")


@SETTINGS
@given(st.data())
def test_config_from_dict_works_or_says_why(data):
    cls, section = data.draw(st.sampled_from([(ModelConfig, "model"), (TrainConfig, "train")]))
    table = data.draw(st.dictionaries(keys_of(cls), VALUES, max_size=4))
    try:
        cfg = from_dict(cls, table, section)
    except SlmError as e:
        assert f"{section}." in str(e) or f"[{section}]" in str(e)  # names what is wrong
        return
    for key, value in table.items():  # what was accepted is what was given (ints may become floats)
        assert getattr(cfg, key) == value


@SETTINGS
@given(st.lists(st.text(max_size=30), max_size=4))
def test_override_strings_work_or_say_why(items):
    try:
        out = parse_overrides(items)
    except SlmError as e:
        assert "section.key=value" in str(e)
        return
    assert all(isinstance(v, dict) for v in out.values())


@SETTINGS
@given(items=st.lists(st.builds("{}.{}={}".format, st.sampled_from(["model", "train", "data"]),
                                st.one_of(st.sampled_from(list(ModelConfig.__dataclass_fields__)
                                                          + list(TrainConfig.__dataclass_fields__)),
                                          st.text(max_size=8)),
                                st.one_of(st.text(max_size=10), st.integers().map(str),
                                          st.sampled_from(["nan", "inf", "-1", "0", "1e400", "true", "[1,2]",
                                                           "{a=1}", '"5m"', "99999999999999999999999"]))),
                      max_size=3))
def test_resolve_config_from_random_overrides(data_dir, items):
    """Everything `slm train` checks before touching RUN_DIR: valid sections or one SlmError line."""
    try:
        sections = resolve_config(data_dir, overrides=items)
    except SlmError:  # the CLI prints it as one line (newlines in echoed input are escaped)
        return
    from_dict(ModelConfig, sections["model"], "model")
    from_dict(TrainConfig, sections["train"], "train")


@SETTINGS
@given(st.one_of(st.binary(max_size=200),
                 st.lists(st.sampled_from(["[model]", "[train]", "[other]", "model = 3", "train = [1]",
                                           "n_layer = 2", "lr = nan", "lr = 1e400", "max_time = 'soon'",
                                           "block_size = 1000000", 'device = "cuda"', "a.b = 1", "[[model]]",
                                           "n_head = 0", "x = \"\\u0000\"", "= 1", "\xff"]),
                          max_size=6).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass"))))
def test_random_config_files_work_or_say_why(data_dir, raw):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "cfg.toml"
        path.write_bytes(raw)
        try:
            resolve_config(data_dir, config_file=str(path), overrides=TINY)
        except SlmError:
            pass


@SETTINGS
@given(st.text(max_size=20))
def test_unknown_presets_suggest_and_list(name):
    if name in preset_names():
        load_preset(name)
        return
    with pytest.raises(SlmError, match="(?s)unknown preset .* choose one of"):
        load_preset(name)


@SETTINGS
@given(st.text(max_size=12))
def test_durations_parse_or_say_why(text):
    try:
        assert parse_duration(text) > 0
    except SlmError as e:
        assert "duration" in str(e)


def test_cli_config_errors_are_one_line(data_dir, tmp_path):
    (tmp_path / "bad.toml").write_bytes(b"\xff\xfe[model]\n")
    for args in (["--config", tmp_path / "bad.toml"], ["--config", tmp_path], ["--preset", "stories_15m"],
                 ["--preset", "tiny\nerror: fake second line"],
                 ["train.lr=nan"], ["train.max_time=\"1..5m\""], ["model.n_layer=99999999999999999999999"]):
        line = assert_one_error_line(*run_cli("train", "--data", data_dir, "--out", tmp_path / "r", *args))
        if "stories_15m" in args:
            assert "did you mean 'stories15m'" in line
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- data reader

ENCODINGS = ["utf-8", "latin-1", "utf-16", "cp1252", "utf-8-sig"]


@st.composite
def corpus_bytes(draw) -> bytes:
    """Text pieces each in its own encoding (so files mix them), separators, NULs, raw bytes."""
    parts = draw(st.lists(st.one_of(
        st.tuples(st.text(max_size=40), st.sampled_from(ENCODINGS)).map(lambda t: t[0].encode(t[1], "replace")),
        st.sampled_from([b"\n<|endoftext|>\n", b"<|endoftext|>", b"\x00", b"\r\n", b"\n", b" \t "]),
        st.binary(max_size=20),
    ), max_size=12))
    return b"".join(parts)


@st.composite
def jsonl_bytes(draw) -> bytes:
    lines = draw(st.lists(st.one_of(
        st.text(max_size=30).map(lambda t: json.dumps({"text": t}).encode()),
        st.recursive(st.one_of(st.none(), st.booleans(), st.floats(), st.text(max_size=10)),
                     lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=5), c, max_size=3)),
                     max_leaves=5).map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=20),
    ), max_size=6))
    return b"\n".join(lines)


def check_prepare(raw: bytes, suffix: str) -> None:
    """`slm prepare` on a file with these bytes: a complete DATA_DIR and exit 0, or one line and
    exit 2 with no DATA_DIR (nor temp folder) left behind."""
    with tempfile.TemporaryDirectory() as d:
        src, out = Path(d) / f"in{suffix}", Path(d) / "data"
        src.write_bytes(raw)
        code, err = run_cli("prepare", "--input", src, "--out", out, "--vocab-size", 300)
        if code == 0:
            meta = load_meta(out)
            for split in ("train", "val"):
                assert len(open_split(out, split)) == meta[split]["tokens"] > 0
            load_tokenizer(out)
        else:
            assert_one_error_line(code, err)
            assert sorted(p.name for p in Path(d).iterdir()) == [src.name]  # nothing half-made


@SETTINGS
@given(corpus_bytes())
def test_prepare_random_txt(raw):
    check_prepare(raw, ".txt")


@SETTINGS
@given(jsonl_bytes())
def test_prepare_random_jsonl(raw):
    check_prepare(raw, ".jsonl")


@pytest.mark.parametrize("raw, suffix", [
    (b"", ".txt"), (b"", ".jsonl"), (b"\n\n<|endoftext|>\n  \n", ".txt"),
    (b"\x00" * 1000, ".txt"),  # NULs are text
    ("héllo wörld\n".encode("utf-16"), ".txt"),  # UTF-16 with BOM
    ("ok\n".encode() + "café\n".encode("latin-1"), ".txt"),  # UTF-8 then latin-1
    (b"[" * 100_000, ".jsonl"),  # nested past the recursion limit
    (b'{"text": "a"}\n{"text": 1e999}\n', ".jsonl"),
])
def test_prepare_edge_cases(raw, suffix):
    check_prepare(raw, suffix)


def test_prepare_huge_line(tmp_path):
    # 1.2 MB on one line: no safe cut, so it is encoded as one piece.
    line = " ".join(["once", "upon", "a", "time", "there", "was", "a", "llama"] * 30_000)
    check_prepare((line + "\n<|endoftext|>\n" + line).encode(), ".txt")


@SETTINGS
@given(st.one_of(st.binary(max_size=80), st.dictionaries(
    st.sampled_from(["vocab_size", "dtype", "eot_id", "train", "val"]),
    st.one_of(st.integers(-5, 10**6), st.text(max_size=6), st.sampled_from(["uint16", "float64", "object"]),
              st.fixed_dictionaries({"tokens": st.one_of(st.integers(-5, 10**6), st.text(max_size=3))})),
    max_size=5).map(lambda m: json.dumps(m).encode())))
def test_damaged_meta_json(data_dir, raw):
    with tempfile.TemporaryDirectory() as d:
        copy = Path(d) / "data"
        shutil.copytree(data_dir, copy)
        (copy / "meta.json").write_bytes(raw)
        try:
            resolve_config(copy, overrides=TINY)
            open_split(copy, "train")
            open_split(copy, "val")
        except SlmError as e:
            assert "\n" not in str(e)


# --------------------------------------------------------------------------- mismatches caught before work


def test_context_longer_than_a_split_is_refused_before_run_dir_exists(data_dir, tmp_path):
    val_tokens = load_meta(data_dir)["val"]["tokens"]
    code, err = run_cli("train", "--data", data_dir, "--out", tmp_path / "r", *TINY,
                        f"model.block_size={val_tokens + 1}")
    assert "val split" in assert_one_error_line(code, err)
    assert not (tmp_path / "r").exists()


def test_data_from_another_tokenizer_with_the_same_vocab_size_is_refused(run_dir, tmp_path):
    other_corpus = tmp_path / "shout.txt"
    other_corpus.write_text("".join(d.upper() + "\n<|endoftext|>\n" for d in make_corpus()), encoding="utf-8")
    other = tmp_path / "other"
    prepare([str(other_corpus)], other, vocab_size=300, val_fraction=0.1)
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    code, err = run_cli("train", "--data", other, "--out", run, *TINY)
    assert "different tokenizer" in assert_one_error_line(code, err)


def test_resume_with_a_longer_context_is_refused(data_dir, run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    code, err = run_cli("train", "--data", data_dir, "--out", run, *TINY, "model.block_size=64")
    assert "model.block_size" in assert_one_error_line(code, err)


@pytest.mark.parametrize("option", [["--temperature", "-1"], ["--temperature", "nan"], ["--top-p", "0"],
                                    ["--top-p", "1.5"], ["--top-k", "-3"], ["--min-p", "2"], ["--max-new-tokens", "0"],
                                    ["--repetition-penalty", "0"], ["--beams", "0"], ["--seed", "-1"]])
def test_sampling_options_are_range_checked(run_dir, option):
    code, err = run_cli("generate", run_dir, "--prompt", "Once", *option)
    assert option[0].lstrip("-").replace("-", "_") in assert_one_error_line(code, err)


# --------------------------------------------------------------------------- untrusted files


class Payload:
    """Unpickling this creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> None:
    torch.save({"weight": torch.zeros(2), "x": Payload(marker)}, path)


def reseal(ckpt: Path) -> None:
    """Rewrite manifest.json to match the files: an attacker can, so checksums alone prove nothing."""
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ckpt.iterdir() if p.name != "manifest.json"}
    (ckpt / "manifest.json").write_text(json.dumps({"files": files}))


def test_the_payload_works_when_unpickled(tmp_path):
    # The control: plain torch.load (weights_only=False) would run it.
    plant(tmp_path / "evil.pt", tmp_path / "marker")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.safetensors", "rng.safetensors"])
def test_pickle_planted_in_a_checkpoint_is_refused_not_run(victim, run_dir, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(run_dir, run)
    for name in ("last", "best"):
        shutil.rmtree(run / f"{name}.old", ignore_errors=True)
        plant(run / name / victim, marker)
        reseal(run / name)
    with pytest.raises(SlmError, match="cannot be read"):
        read_checkpoint(run / "last", with_optimizer=True)  # what slm train's resume reads
    code, err = run_cli("info", run)  # reads last/ without the optimizer
    if victim != "optimizer.safetensors":
        assert_one_error_line(code, err)
    assert not marker.exists()


def test_pickle_files_next_to_a_checkpoint_are_never_opened(run_dir, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(run_dir, run)
    for name in ("model.pt", "optimizer.pt", "pytorch_model.bin", "state.pkl"):
        plant(run / "best" / name, marker)
    reseal(run / "best")  # even when the manifest lists them
    model, _, info = load_run(run, which="best")
    assert info["checkpoint"] == str(run / "best") and not marker.exists()


def test_no_unsafe_loader_in_the_code():
    """Every torch.load says weights_only=True; nothing else that unpickles is called."""
    unsafe = {"pickle.load", "pickle.loads", "dill.load", "joblib.load", "torch.jit.load", "pd.read_pickle"}
    for path in sorted((REPO / "slmkit").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
            where = f"{path.name}:{node.lineno}: {ast.unparse(node)}"
            assert name not in unsafe, where
            if name == "torch.load":
                assert kwargs.get("weights_only") == "True", where
            if name in ("np.load", "numpy.load"):
                assert kwargs.get("allow_pickle", "False") == "False", where


def cut_short(path: Path, marker: Path) -> None:
    torch.save({"weight": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:200])


# What ends up in a pytorch_model.bin, and the exception torch.load(weights_only=True) raises for it.
BAD_BINS = {"code": (plant, "UnpicklingError"),
            "list": (lambda path, marker: torch.save([torch.zeros(2)], path), "list"),
            "not-a-pickle": (lambda path, marker: path.write_bytes(b"not a pickle"), "UnpicklingError"),
            "empty": (lambda path, marker: path.write_bytes(b""), "EOFError"),
            "cut-short": (cut_short, "RuntimeError")}


@pytest.mark.parametrize("make_bin, why", BAD_BINS.values(), ids=BAD_BINS.keys())
def test_hf_import_refuses_a_pickle_payload(make_bin, why, tmp_path):
    src, marker = tmp_path / "hf", tmp_path / "marker"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2,
                                                 "vocab_size": 300, "n_positions": 8}))
    make_bin(src / "pytorch_model.bin", marker)
    code, err = run_cli("import-hf", src, "--out", tmp_path / "run")
    assert assert_one_error_line(code, err) == (
        f"error: {src / 'pytorch_model.bin'} cannot be read as a plain dict of tensors ({why}), and slmkit loads "
        "nothing else from a pickle: convert it to model.safetensors (save_pretrained(safe_serialization=True))")
    assert not marker.exists() and not (tmp_path / "run").exists()
